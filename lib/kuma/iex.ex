defmodule Kuma.IEx do
  @moduledoc """
  Helpers for looking at a store from `iex -S mix` (the repository's `.iex.exs` starts a
  demo store on `./data` and imports them):

      kuma> append("alice", {:deposited, 50})
      {:ok, 1}
      kuma> history("alice")
        1  deposited  {:deposited, 50}  2026-12-02T11:20:01Z
      kuma> chain("alice")
        1  3f9a0c...  (verified: 1 events)
      kuma> state("alice")
      {:deposited, 50}

  Every helper works on the store named `:demo` unless given another as the last argument.
  """

  @default :demo

  @doc "Starts the demo store on `data_dir` (the demo's `./data` by default) with its monitor, and returns its name."
  @spec start_demo(Path.t()) :: {:ok, atom()} | {:error, term()}
  def start_demo(data_dir \\ "data") do
    opts = [name: @default, data_dir: data_dir, shards: 16, http: [port: 9568]] ++ master_key()

    case Kuma.start(opts) do
      {:ok, _} ->
        {:ok, @default}

      {:error, {:http, _, :eaddrinuse}} ->
        with {:ok, _} <- Kuma.start(Keyword.put(opts, :http, port: 0)), do: {:ok, @default}

      {:error, {:already_started, _}} ->
        {:ok, @default}

      error ->
        error
    end
  end

  @doc """
  The master key options of the demo store: `KUMA_MASTER_KEY` if set, else the key file
  `~/.config/kuma/demo-master.key` (created, mode 0600, outside any data dir, if missing).
  """
  @spec master_key() :: keyword()
  def master_key do
    if System.get_env("KUMA_MASTER_KEY") in [nil, ""], do: [master_key_file: demo_key_file()], else: []
  end

  @doc "The demo's key file, created if missing (see `master_key/0`)."
  @spec demo_key_file() :: Path.t()
  def demo_key_file do
    path = Path.expand("~/.config/kuma/demo-master.key")

    unless File.exists?(path) do
      File.mkdir_p!(Path.dirname(path))
      File.write!(path, Base.encode16(:crypto.strong_rand_bytes(32), case: :lower) <> "\n")
      File.chmod!(path, 0o600)
    end

    path
  end

  @doc "The banner `.iex.exs` prints: the store, where its monitor is, and the helpers."
  @spec banner(atom()) :: String.t()
  def banner(store \\ @default) do
    {:ok, info} = Kuma.info(store)

    """
    Kuma #{Application.spec(:kuma, :vsn)} · store #{inspect(store)} on #{Path.relative_to_cwd(info.data_dir)} \
    (#{info.shards} shards, #{if info.encrypted, do: "encrypted", else: "plain"})#{if info.http, do: " · monitor #{info.http}", else: ""}
    Helpers: append(id, event), state(id), history(id), chain(id), info(), h Kuma.IEx for more
    """
  end

  @doc "Appends `event` (or a list of them) to entity `id`."
  @spec append(binary(), term(), atom()) :: {:ok, non_neg_integer()} | {:error, term()}
  def append(id, event, store \\ @default), do: Kuma.append(store, id, event)

  @doc "The entity's state (its last event, as `Kuma.Aggregate.Latest` keeps it)."
  @spec state(binary(), atom()) :: term()
  def state(id, store \\ @default), do: Kuma.read(Kuma.entity(store, id))

  @doc "Prints the entity's events: seq, type, data, time."
  @spec history(binary(), atom()) :: :ok
  def history(id, store \\ @default) do
    case Kuma.events(store, id) do
      {:ok, []} ->
        IO.puts("  (no events)")

      {:ok, events} ->
        for e <- events do
          time = e.timestamp |> DateTime.from_unix!(:microsecond) |> DateTime.truncate(:second) |> DateTime.to_iso8601()
          IO.puts("  #{String.pad_leading(Integer.to_string(e.seq), 4)}  #{e.type}  #{inspect(e.data)}  #{time}")
        end

        :ok

      {:error, reason} ->
        IO.puts("  " <> Kuma.format_error(reason))
    end
  end

  @doc "Prints the entity's hash chain (each event's hash) and verifies it."
  @spec chain(binary(), atom()) :: :ok
  def chain(id, store \\ @default) do
    with {:ok, events} <- Kuma.events(store, id),
         for(
           e <- events,
           do:
             IO.puts(
               "  #{String.pad_leading(Integer.to_string(e.seq), 4)}  #{Base.encode16(e.hash, case: :lower) |> binary_part(0, 16)}..."
             )
         ),
         {:ok, %{events: n}} <- Kuma.verify(store, id) do
      IO.puts("  verified: #{n} events, each hash over the one before it")
    else
      {:error, reason} -> IO.puts("  " <> Kuma.format_error(reason))
    end
  end

  @doc "Facts about the store: shards, positions, encryption, monitor URL."
  @spec info(atom()) :: map()
  def info(store \\ @default) do
    {:ok, info} = Kuma.info(store)
    {:ok, positions} = Kuma.position(store)
    info |> Map.delete(:writers) |> Map.put(:positions, positions)
  end
end
