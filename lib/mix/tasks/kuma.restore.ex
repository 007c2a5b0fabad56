defmodule Mix.Tasks.Kuma.Restore do
  @shortdoc "Restores a backup as a new data dir, checking everything first"
  @moduledoc """
  Restores the backup in `BACKUP_DIR` as a new data dir `DATA_DIR` (`Kuma.restore/3`):
  every frame of every segment is checked before anything is written, the files are
  written to a temporary directory, the store is opened there and every chain verified,
  and only then is it renamed to `DATA_DIR`. Progress is printed per file and phase.

      mix kuma.restore BACKUP_DIR DATA_DIR [--keystore-path FILE] [--master-key-file FILE]

  `--keystore-path` restores with that keystore (normally the store's current one: then
  entities erased after the backup stay erased) instead of one in the backup; start the
  store with the same `keystore_path:` afterwards. The master key comes from
  `KUMA_MASTER_KEY` or `--master-key-file`.

  Exit codes: 0 restored; 1 the backup is damaged or fails verification (the first bad
  frame or chain is named; nothing is written); 2 bad arguments, `DATA_DIR` not empty, or
  another error. See `mix help kuma`.
  """
  use Mix.Task

  @impl true
  def run(args), do: Mix.Tasks.Kuma.parse(__MODULE__, args, [keystore_path: :string], &restore/2)

  defp restore(opts, [backup_dir, data_dir]) do
    Mix.Task.run("app.start", [])

    progress = fn %{phase: phase, done: done, total: total, segment: seg} ->
      Mix.shell().info("#{phase} #{done}/#{total} #{seg}")
    end

    restore_opts = Keyword.take(opts, [:keystore_path, :master_key_file]) ++ [on_progress: progress]

    case Kuma.restore(backup_dir, data_dir, restore_opts) do
      {:ok, r} ->
        keystore =
          case r.keystore do
            true -> "the backup's keystore"
            :external -> "the keystore at #{opts[:keystore_path]} (start the store with keystore_path: it)"
            false -> "no keystore (a plain store)"
          end

        Mix.shell().info(
          "ok: #{r.events} events of #{r.entities} entities in #{length(r.shards)} shards, every chain verified, " <>
            "with #{keystore}; backup taken #{r.taken}; restored to #{r.dir}"
        )

      {:error, {:backup_damaged, _, _, _} = reason} ->
        Mix.Tasks.Kuma.fail(Kuma.format_error(reason), 1)

      {:error, {:tampered, problems} = reason} ->
        Mix.Tasks.Kuma.print_problems(problems)
        Mix.Tasks.Kuma.fail("restore refused: #{Kuma.format_error(reason)}; nothing was written", 1)

      {:error, reason} ->
        Mix.Tasks.Kuma.fail("restore failed: #{Kuma.format_error(reason)}")
    end
  end

  defp restore(_opts, _rest), do: Mix.Tasks.Kuma.fail("give BACKUP_DIR and DATA_DIR (see --help)")
end
