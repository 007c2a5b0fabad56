defmodule Mix.Tasks.Kuma do
  @shortdoc "Lists Kuma's mix tasks"
  @moduledoc """
  Kuma's command-line tasks, for people who run a store: `mix kuma.verify`, `mix
  kuma.stats`, `mix kuma.export ID`, `mix kuma.erase ID`, `mix kuma.backup DIR` and `mix
  kuma.restore BACKUP_DIR DATA_DIR`. Each but the last takes `--data-dir DIR` (default
  `data`, the demo's) and opens the store there (the shard count and encryption are read
  from the store's manifest); an encrypted store's master key comes from
  `KUMA_MASTER_KEY` or `--master-key-file FILE`. Each has `--help`.

  Exit codes a script can use: 0 done; 1 the check found a problem (`kuma.verify`,
  `kuma.restore` of a damaged backup) or the answer was no (`kuma.erase`); 2 bad
  arguments, or the store could not be opened.
  """
  use Mix.Task

  @impl true
  def run(_args) do
    for task <- ["kuma.verify", "kuma.stats", "kuma.export", "kuma.erase", "kuma.backup", "kuma.restore"] do
      Mix.shell().info("mix #{task}\t# #{Mix.Task.shortdoc(Mix.Task.get!(task))}")
    end
  end

  @doc false
  # Parses the common options plus `extra` (OptionParser strict switches), opens the store
  # and runs `fun.(store, opts, rest)`; `--help` prints the task's doc. The store is
  # stopped afterwards; errors end the task with exit code 2.
  def with_store(task, args, extra, fun) do
    parse(task, args, [data_dir: :string] ++ extra, &open_and_run(&1, &2, fun))
  end

  @doc false
  # Parses `args` with `switches` (OptionParser strict) plus --master-key-file and --help,
  # and runs `fun.(opts, rest)`; `--help` prints the task's doc instead, bad options end
  # the task with exit code 2.
  def parse(task, args, switches, fun) do
    case OptionParser.parse(args, strict: [master_key_file: :string, help: :boolean] ++ switches) do
      {opts, rest, []} ->
        if opts[:help], do: Mix.shell().info(Code.fetch_docs(task) |> moduledoc()), else: fun.(opts, rest)

      {_opts, _rest, invalid} ->
        fail("unknown or bad options: #{Enum.map_join(invalid, ", ", &elem(&1, 0))} (see --help)")
    end
  end

  @doc false
  # Prints each broken chain of a `{:tampered, problems}` (verify_store, restore) to stderr.
  def print_problems(problems) do
    for p <- problems,
        do: Mix.shell().error("shard #{p.shard}: #{inspect(p.entity_id)} broken at seq #{p.seq}: #{p.why}")

    :ok
  end

  defp moduledoc({:docs_v1, _, _, _, %{"en" => doc}, _, _}), do: doc
  defp moduledoc(_), do: "no documentation"

  defp open_and_run(opts, rest, fun) do
    dir = Path.expand(Keyword.get(opts, :data_dir, "data"))
    Mix.Task.run("app.start", [])

    with {:ok, manifest} <- manifest(dir),
         name = :"kuma_task_#{System.unique_integer([:positive])}",
         start_opts = [name: name, data_dir: dir, shards: manifest.shards, encryption: manifest.encrypted],
         start_opts =
           if(opts[:master_key_file], do: [master_key_file: opts[:master_key_file]] ++ start_opts, else: start_opts),
         {:ok, store} <- Kuma.start(start_opts) do
      try do
        fun.(store, opts, rest)
      after
        Kuma.stop(store)
      end
    else
      {:error, reason} -> fail("cannot open the store in #{dir}: #{Kuma.format_error(reason)}")
    end
  end

  # The shard count and encryption, from the store's manifest (a text file).
  defp manifest(dir) do
    case File.read(Path.join(dir, "KUMA")) do
      {:ok, text} ->
        shards = Regex.run(~r/^shards (\d+)$/m, text, capture: :all_but_first)
        encryption = Regex.run(~r/^encryption (on|off)$/m, text, capture: :all_but_first)

        case {shards, encryption} do
          {[n], [e]} -> {:ok, %{shards: String.to_integer(n), encrypted: e == "on"}}
          _ -> {:error, {:invalid, :data_dir, "#{dir}/KUMA is not a Kuma manifest"}}
        end

      {:error, :enoent} ->
        {:error, {:invalid, :data_dir, "no Kuma store in #{dir} (no KUMA manifest)"}}

      {:error, why} ->
        {:error, {:invalid, :data_dir, "#{dir}/KUMA: #{:file.format_error(why)}"}}
    end
  end

  @doc false
  # The one entity id a task takes.
  def single_id(rest), do: single_arg(rest, "give exactly one entity id (see --help)")

  @doc false
  # The one argument a task takes, or `fail(complaint)`.
  def single_arg([arg], _complaint), do: arg
  def single_arg(_, complaint), do: fail(complaint)

  @doc false
  # A byte count for people.
  def size(bytes) when bytes >= 1_048_576, do: "#{Float.round(bytes / 1_048_576, 1)} MiB"
  def size(bytes) when bytes >= 1024, do: "#{Float.round(bytes / 1024, 1)} KiB"
  def size(bytes), do: "#{bytes} B"

  @doc false
  # Prints `message` to stderr and ends the task with `code` (2 by default).
  def fail(message, code \\ 2) do
    Mix.shell().error(message)
    exit({:shutdown, code})
  end
end
