defmodule Kuma.StoreCase do
  @moduledoc """
  Test case template: every test gets its own data directory and a running store
  (4 shards unless `@tag store_opts: [...]` says otherwise), stopped and deleted afterwards.
  `@tag store: false` gives only the directory and a fresh name.
  """
  use ExUnit.CaseTemplate

  using do
    quote do
      import Kuma.StoreCase
    end
  end

  setup context do
    # Unique across runs too: unique_integer restarts with every VM, /tmp does not.
    dir = Path.join(System.tmp_dir!(), "kuma_test_#{System.pid()}_#{System.unique_integer([:positive])}")
    File.rm_rf!(dir)
    name = :"kuma_test_#{System.unique_integer([:positive])}"

    on_exit(fn ->
      Kuma.stop(name)
      File.rm_rf!(dir)
    end)

    if Map.get(context, :store, true) do
      opts = Keyword.merge([name: name, data_dir: dir, shards: 4], Map.get(context, :store_opts, []))
      {:ok, store} = Kuma.start(opts)
      %{store: store, dir: dir, name: name}
    else
      %{dir: dir, name: name}
    end
  end

  @doc "The seqs of an entity's events, read back from storage."
  def seqs(store, id) do
    {:ok, events} = Kuma.events(store, id)
    Enum.map(events, & &1.seq)
  end

  @doc "Every regular file under `dir`, recursively."
  def files_under(dir) do
    Path.wildcard(Path.join(dir, "**"), match_dot: true) |> Enum.filter(&File.regular?/1)
  end

  @doc """
  The regular files under `dir` whose bytes contain any of `needles`. A file removed
  between listing and reading (a Raft snapshot or segment being replaced) holds nothing.
  """
  def files_holding(dir, needles) do
    Enum.filter(files_under(dir), fn f ->
      case File.read(f) do
        {:ok, b} -> Enum.any?(needles, &String.contains?(b, &1))
        {:error, :enoent} -> false
      end
    end)
  end

  @doc "Polls `fun` every `every` ms until it returns true; false if it never does within `tries` polls."
  def eventually(fun, tries \\ 150, every \\ 20) do
    cond do
      fun.() -> true
      tries == 0 -> false
      true -> Process.sleep(every) && eventually(fun, tries - 1, every)
    end
  end

  @doc "An external term holding an atom this VM has never seen (as another VM could have stored)."
  def unknown_atom_term do
    name = "kuma_never_seen_atom_#{System.unique_integer([:positive])}_#{:erlang.unique_integer([:positive])}"
    <<131, 119, byte_size(name), name::binary>>
  end
end
