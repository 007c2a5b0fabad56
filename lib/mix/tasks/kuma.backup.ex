defmodule Mix.Tasks.Kuma.Backup do
  @shortdoc "Takes a backup of a store into a new directory"
  @moduledoc """
  Takes a backup of the store in `--data-dir` into `DIR` (`Kuma.backup/3`), printing
  progress per file: every shard, the store-wide order and persistent subscriptions, as
  CRC32-framed segments with a manifest. `DIR` must not exist, or be empty.

      mix kuma.backup DIR [--keystore] [--data-dir DIR] [--master-key-file FILE]

  `--keystore` also copies the keystore: such a backup can read entities erased after it
  was taken (see "Backups and erasure" in `Kuma.Backup`). This task opens the store, so it
  must not be running; a running application calls `Kuma.backup/3` itself (the backup is
  online: writes go on).

  Exit codes: 0 done; 2 bad arguments, the store could not be opened or the backup failed
  (nothing is left in `DIR` then). See `mix help kuma`.
  """
  use Mix.Task

  @impl true
  def run(args) do
    Mix.Tasks.Kuma.with_store(__MODULE__, args, [keystore: :boolean], fn store, opts, rest ->
      dir = Mix.Tasks.Kuma.single_arg(rest, "give the backup directory (see --help)")

      progress = fn %{done: done, total: total, segment: seg, bytes: bytes} ->
        Mix.shell().info("#{done}/#{total} #{seg}: #{Mix.Tasks.Kuma.size(bytes)}")
      end

      case Kuma.backup(store, dir, keystore: opts[:keystore] || false, on_progress: progress) do
        {:ok, r} ->
          keystore = if r.keystore, do: "with the keystore", else: "without the keystore"

          Mix.shell().info(
            "ok: #{Mix.Tasks.Kuma.size(r.bytes)} in #{r.segments} segments (#{length(r.shards)} shards, #{keystore}) " <>
              "in #{Float.round(r.seconds, 2)} s to #{r.dir}"
          )

        {:error, reason} ->
          Mix.Tasks.Kuma.fail("backup failed: #{Kuma.format_error(reason)}")
      end
    end)
  end
end
