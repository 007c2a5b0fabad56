defmodule Mix.Tasks.Kuma.Stats do
  @shortdoc "Prints a store's facts: shards, events, positions, files"
  @moduledoc """
  Prints a store's facts: its id, shards, encryption, per-shard last position and file
  size, the end of the store-wide order, and the total size on disk.

      mix kuma.stats [--data-dir DIR] [--master-key-file FILE]

  Exit codes: 0 printed; 2 bad arguments, or the store could not be opened. See `mix
  help kuma`.
  """
  use Mix.Task

  @impl true
  def run(args) do
    Mix.Tasks.Kuma.with_store(__MODULE__, args, [], fn store, _opts, _rest ->
      {:ok, info} = Kuma.info(store)
      {:ok, positions} = Kuma.position(store)
      shell = Mix.shell()
      shell.info("store #{info.store_id} in #{info.data_dir}")
      shell.info("shards #{info.shards}, sync #{info.sync}, encryption #{if info.encrypted, do: "on", else: "off"}")

      for shard <- 0..(info.shards - 1) do
        file = Kuma.Store.shard_file(info.data_dir, shard)
        size = file_size(file) + file_size(file <> "-wal")
        shell.info("shard #{shard}: last position #{Map.get(positions, shard, 0)}, #{size} bytes")
      end

      case Kuma.global_position(store) do
        {:ok, n} -> shell.info("store-wide order: #{n} events")
        {:error, _} -> shell.info("store-wide order: not kept")
      end

      total = info.data_dir |> Path.join("**") |> Path.wildcard() |> Enum.map(&file_size/1) |> Enum.sum()
      shell.info("on disk: #{total} bytes")
    end)
  end

  defp file_size(path) do
    case File.stat(path) do
      {:ok, %{type: :regular, size: size}} -> size
      _ -> 0
    end
  end
end
