defmodule Kuma.Cluster.ShardSnapshot do
  @moduledoc false
  # Raft snapshots of a shard (the `:ra_snapshot` behaviour). A snapshot is a directory
  # that ra names after its index and term, holding:
  #
  #   shard.kuma  a copy of the member's shard file (VACUUM INTO), made by its writer once
  #               every entry queued before is committed, so it holds at least the
  #               snapshot's index (its own `applied_index` says exactly how far it goes,
  #               and entries at or below that are skipped when replayed)
  #   meta        term_to_binary({ra's snapshot meta, the machine's state})
  #
  # ra truncates its log up to the index, and sends the directory in chunks to a member
  # that needs entries it no longer has. That member, in `recover/1`, takes the copy as
  # its shard file if its own is behind: it first fetches the data keys it lacks from a
  # member that has them (snapshots carry no keys, so that an erasure's destroyed key
  # survives in no snapshot), then has its writer swap the file in.
  #
  # The copies are crypto-shredded like backups: an entity erased after a snapshot keeps
  # rows there, sealed under the key its erasure destroyed; the next snapshot drops them.
  @behaviour :ra_snapshot

  alias Kuma.{Cluster, Native, Store}

  @files ["meta", "shard.kuma"]

  @impl :ra_snapshot
  def prepare(_meta, machine_state), do: machine_state

  @impl :ra_snapshot
  def write(dir, meta, %{store: name, shard: shard} = machine_state) do
    dir = to_string(dir)

    with {:ok, s} <- Store.lookup(name),
         {:ok, _applied} <- Native.cluster_backup(s.native, shard, Path.join(dir, "shard.kuma")) do
      File.write(Path.join(dir, "meta"), :erlang.term_to_binary({meta, machine_state}))
    end
  end

  # The files are opened once: ra may replace this snapshot by a newer one (and delete its
  # directory) while it is being sent, and an open file stays readable.
  @impl :ra_snapshot
  def begin_read(dir) do
    with {:ok, meta} <- read_meta(dir),
         {:ok, files} <- open_all(to_string(dir)) do
      {:ok, meta, files}
    end
  end

  defp open_all(dir) do
    Enum.reduce_while(@files, {:ok, []}, fn file, {:ok, acc} ->
      case :file.open(String.to_charlist(Path.join(dir, file)), [:read, :binary, :raw]) do
        {:ok, fd} ->
          {:cont, {:ok, acc ++ [{file, fd, 0}]}}

        error ->
          Enum.each(acc, fn {_, fd, _} -> :file.close(fd) end)
          {:halt, error}
      end
    end)
  end

  @impl :ra_snapshot
  def read_chunk([{file, fd, offset} | rest], size, _dir) do
    data =
      case :file.pread(fd, offset, size) do
        {:ok, data} -> {:ok, data}
        :eof -> {:ok, <<>>}
        error -> error
      end

    case data do
      {:ok, data} when byte_size(data) == size ->
        {:ok, {file, data}, {:next, [{file, fd, offset + size} | rest]}}

      {:ok, data} ->
        :file.close(fd)
        if rest == [], do: {:ok, {file, data}, :last}, else: {:ok, {file, data}, {:next, rest}}

      {:error, _} = error ->
        Enum.each([{file, fd, offset} | rest], fn {_, fd, _} -> :file.close(fd) end)
        error
    end
  end

  @impl :ra_snapshot
  def begin_accept(dir, _meta) do
    dir = to_string(dir)
    File.mkdir_p!(dir)
    for file <- @files, do: File.rm(Path.join(dir, file))
    {:ok, dir}
  end

  @impl :ra_snapshot
  def accept_chunk({file, data}, dir) when file in @files do
    :ok = File.write(Path.join(dir, file), data, [:append, :binary])
    {:ok, dir}
  end

  @impl :ra_snapshot
  def complete_accept(chunk, dir) do
    {:ok, _} = accept_chunk(chunk, dir)
    :ok
  end

  @impl :ra_snapshot
  def recover(dir) do
    dir = to_string(dir)

    with {:ok, {meta, machine_state}} <- read(dir),
         :ok <- take(dir, meta, machine_state) do
      {:ok, meta, machine_state}
    end
  end

  @impl :ra_snapshot
  def validate(dir) do
    dir = to_string(dir)

    with {:ok, _} <- read(dir) do
      if File.regular?(Path.join(dir, "shard.kuma")), do: :ok, else: {:error, :no_shard_copy}
    end
  end

  @impl :ra_snapshot
  def read_meta(dir) do
    with {:ok, {meta, _state}} <- read(to_string(dir)), do: {:ok, meta}
  end

  defp read(dir) do
    with {:ok, bin} <- File.read(Path.join(dir, "meta")) do
      {:ok, :erlang.binary_to_term(bin)}
    end
  rescue
    ArgumentError -> {:error, :invalid_format}
  end

  # A member whose shard file is behind the snapshot takes the copy: the keys it lacks,
  # from another member, then the file.
  defp take(dir, %{index: index}, %{store: name, shard: shard}) do
    with {:ok, s} <- Store.lookup(name),
         {:ok, applied} <- Native.cluster_applied_index(s.native, shard) do
      if applied >= index do
        :ok
      else
        copy = Path.join(dir, "shard.kuma")

        with {:ok, indexes} <- Native.cluster_copy_indexes(copy),
             {:ok, missing} <- Native.cluster_missing_keys(s.native, indexes),
             :ok <- fetch_keys(s, shard, missing),
             {:ok, now} <- Native.cluster_install(s.native, shard, copy) do
          # The machine's cache of what the file holds (Kuma.Cluster.ShardMachine).
          Process.put({:kuma_applied, shard}, now)
          :ok
        end
      end
    end
  end

  defp fetch_keys(_s, _shard, []), do: :ok

  defp fetch_keys(s, shard, missing) do
    others = Cluster.members(s.cluster, shard) -- [node()]

    # A key another member no longer has belongs to an entity erased after the copy was
    # made: the erasure is recorded here instead (its entry follows the copy in the log).
    Enum.find_value(others, {:error, {:keys_unavailable, length(missing)}}, fn node ->
      case :erpc.call(node, __MODULE__, :export_keys, [s.name, missing], 30_000) do
        {:ok, {keys, erased}} when length(keys) + length(erased) == length(missing) ->
          with {:ok, :ok} <- Native.cluster_install_keys(s.native, keys),
               {:ok, :ok} <- Native.cluster_record_erased(s.native, erased),
               do: :ok

        _ ->
          nil
      end
    end)
  catch
    _, _ -> {:error, {:keys_unavailable, length(missing)}}
  end

  @doc false
  # On a member that has them: the wrapped keys another member needs to take a copy, and
  # which of them were erased here.
  def export_keys(name, indexes) do
    with {:ok, s} <- Store.lookup(name), do: Native.cluster_export_keys(s.native, indexes)
  end
end
