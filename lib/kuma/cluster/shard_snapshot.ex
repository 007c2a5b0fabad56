defmodule Kuma.Cluster.ShardSnapshot do
  @moduledoc false
  # Raft snapshots of a shard (the `:ra_snapshot` behaviour). The state a snapshot stands
  # for is the member's shard file itself, which holds every entry applied (its own
  # `applied_index` says how far; entries at or below it are skipped when replayed). So
  # taking a snapshot costs almost nothing: the member's writer commits what is queued
  # (a barrier), and ra writes a directory named after the index and term holding:
  #
  #   meta        term_to_binary({ra's snapshot meta, the machine's state})
  #
  # ra then truncates its log up to the index. Only when ra sends the snapshot to a member
  # that needs entries the log no longer has is a copy of the file made, from a read
  # transaction (the writer goes on), and sent in chunks after `meta` as `shard.kuma`. The
  # receiving member, in `recover/1`, takes the copy if its own file is behind: it first
  # fetches the data keys it lacks from a member that has them (copies carry no keys, so
  # that an erasure's destroyed key survives in no snapshot), then its writer restores the
  # copy into the live file, and the copy is deleted. So copies exist only in transit.
  @behaviour :ra_snapshot

  alias Kuma.{Cluster, Native, Store}

  @files ["meta", "shard.kuma"]

  @impl :ra_snapshot
  def prepare(_meta, machine_state), do: machine_state

  @impl :ra_snapshot
  def write(dir, %{index: index} = meta, %{store: name, shard: shard} = machine_state) do
    dir = to_string(dir)

    with {:ok, s} <- Store.lookup(name),
         {:ok, applied} <- Native.cluster_snapshot_point(s.native, shard),
         :ok <- if(applied >= index, do: :ok, else: {:error, {:shard_behind_snapshot, applied, index}}) do
      File.write(Path.join(dir, "meta"), :erlang.term_to_binary({meta, machine_state}))
    end
  end

  # The copy is made for each send, into a file of the store's own that is unlinked as soon
  # as it is open: ra may replace this snapshot by a newer one (and delete its directory)
  # while it is being sent, and no copy is left behind once it is sent.
  @impl :ra_snapshot
  def begin_read(dir) do
    dir = to_string(dir)

    with {:ok, bin} <- File.read(Path.join(dir, "meta")),
         {meta, %{store: name, shard: shard}} <- :erlang.binary_to_term(bin),
         {:ok, s} <- Store.lookup(name),
         {:ok, fd} <- private_copy(s, shard) do
      {:ok, meta, [{"meta", {:data, bin}}, {"shard.kuma", fd, 0}]}
    end
  end

  defp private_copy(s, shard) do
    tmp = Path.join([s.data_dir, "raft", "sending", "shard-#{shard}-#{System.unique_integer([:positive])}.kuma"])

    with :ok <- File.mkdir_p(Path.dirname(tmp)),
         {:ok, _applied} <- Native.cluster_copy(s.native, shard, tmp),
         {:ok, fd} <- :file.open(String.to_charlist(tmp), [:read, :binary, :raw]) do
      File.rm(tmp)
      {:ok, fd}
    else
      error ->
        File.rm(tmp)
        error
    end
  end

  @impl :ra_snapshot
  def read_chunk([{file, {:data, data}} | rest], _size, _dir) do
    if rest == [], do: {:ok, {file, data}, :last}, else: {:ok, {file, data}, {:next, rest}}
  end

  def read_chunk([{file, fd, offset} | rest], size, _dir) do
    case :file.pread(fd, offset, size) do
      {:ok, data} when byte_size(data) == size ->
        {:ok, {file, data}, {:next, [{file, fd, offset + size} | rest]}}

      {:ok, data} ->
        :file.close(fd)
        if rest == [], do: {:ok, {file, data}, :last}, else: {:ok, {file, data}, {:next, rest}}

      :eof ->
        :file.close(fd)
        if rest == [], do: {:ok, {file, <<>>}, :last}, else: {:ok, {file, <<>>}, {:next, rest}}

      {:error, _} = error ->
        :file.close(fd)
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
    with {:ok, _} <- read(to_string(dir)), do: :ok
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

  # A member whose shard file is behind the snapshot takes the copy that came with it: the
  # keys it lacks, from another member, then the file. The copy then goes: the shard file
  # holds the snapshot, and no copy of the shard lingers in ra's files.
  defp take(dir, %{index: index}, %{store: name, shard: shard}) do
    copy = Path.join(dir, "shard.kuma")

    with {:ok, s} <- Store.lookup(name),
         {:ok, applied} <- Native.cluster_applied_index(s.native, shard),
         :ok <- take(s, shard, copy, applied, index) do
      File.rm(copy)
      :ok
    end
  end

  defp take(_s, _shard, _copy, applied, index) when applied >= index, do: :ok

  defp take(s, shard, copy, applied, index) do
    with true <- File.regular?(copy) || {:error, {:shard_behind_snapshot, applied, index}},
         {:ok, indexes} <- Native.cluster_copy_indexes(copy),
         {:ok, missing} <- Native.cluster_missing_keys(s.native, indexes),
         :ok <- fetch_keys(s, shard, missing),
         {:ok, now} <- Native.cluster_install(s.native, shard, copy) do
      # The machine's cache of what the file holds (Kuma.Cluster.ShardMachine).
      Process.put({:kuma_applied, shard}, now)
      # The copy may hold erasures this member never applied from the log, whose earlier
      # entries its own log files still hold: push everything up to the snapshot out.
      Kuma.Cluster.Purge.erased(s.name, shard, index)
      :ok
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
