defmodule Kuma.Erasure do
  @moduledoc """
  Erasure of an entity (GDPR Art. 17) and the hook that lets read models forget it.

  `Kuma.delete/2` (implemented here) does, in order:

  1. stops the entity's process, if live;
  2. in the shard's writer thread, in one small transaction, synced to disk whatever the
     store's sync mode: writes a tombstone holding a keyed hash of the id (never the id),
     deletes the entity's row, snapshots and skip entries, and queues its events for
     deletion; then destroys the entity's data key in the keystore (`secure_delete`, WAL
     truncated) and marks the tombstone done. From here the entity is unreadable and
     `delete` answers;
  3. the writer deletes the entity's events, newest first, in chunks of at most 2,000
     events or 4 ms, one transaction each, between the shard's other writes (SQLite
     `secure_delete` zeroes the freed bytes); a crash resumes where it stopped. A plain
     (unencrypted) store's shard is then compacted (`VACUUM`: its rows were in clear and
     SQLite may have left moved copies of them in free space), which holds that shard's
     writer for as long as rewriting the file takes. `Kuma.erasure_status/2` reports
     `:pending` until this is done, and `Kuma.flush/1` waits for it;
  4. stops the entity again if something restarted it meanwhile, and stops every live
     entity whose state holds a revealed `Kuma.Sensitive` value of the erased subject, so
     they reload with the placeholder;
  5. tells every forget listener of the store to drop what it derived from the entity and
     waits for each to confirm.

  A crash between the commit and the key's destruction is finished at the next start
  (tombstones not marked done). Deleting is idempotent: deleting again (or deleting an id
  that never existed) returns `events_deleted: 0` and re-notifies listeners.

  ## After erasure

  * Appends to the id return `{:error, :entity_erased}`; so do `Kuma.head/2`, reads,
    `Kuma.export/2` and loading the entity. The id is never silently reused.
  * Old backups of the shards still hold the entity's ciphertexts, which no key can open
    any more (crypto-shredding), provided the keystore is not restored from a backup taken
    before the erasure: back the keystore up separately and for a short retention, or not
    at all (see docs/storage-format.md, "Erasure").

  ## Forget listeners

  A process that keeps data derived from entities (a read model, a cache) calls
  `listen/1` once; on each erasure it receives

      {:kuma_forget, store_name, entity_id, reply_to}

  and must call `forgotten(reply_to)` once it dropped everything it holds about
  `entity_id`. `Kuma.delete/2` waits up to `:forget_timeout` ms (default 5,000) for all
  listeners; when some did not answer it returns `{:error, {:forget_unconfirmed, pids}}`
  (the storage erasure is complete; call delete again to retry the notifications). In
  cluster mode the listeners of every node are told; the list also names the nodes that
  could not be asked (`Kuma.Cluster`, "Projections").
  """

  alias Kuma.{EventLog, Store}

  @default_timeout 60_000
  @default_forget_timeout 5_000

  @typedoc "Opaque: pass it to `forgotten/1`."
  @type reply_to :: {pid(), reference()}

  @doc "Registers the calling process as a forget listener of `store` (see the moduledoc)."
  @spec listen(Kuma.store()) :: :ok | {:error, term()}
  def listen(store) do
    with {:ok, s} <- Store.lookup(store) do
      {:ok, _} = Registry.register(Kuma.Listeners, {s.name, :forget}, nil)
      :ok
    end
  end

  @doc "Stops listening for erasures of `store`."
  @spec unlisten(Kuma.store()) :: :ok | {:error, term()}
  def unlisten(store) do
    with {:ok, s} <- Store.lookup(store), do: Registry.unregister(Kuma.Listeners, {s.name, :forget})
  end

  @doc "Confirms to `Kuma.delete/2` that this listener forgot the entity."
  @spec forgotten(reply_to()) :: :ok
  def forgotten({pid, ref}) when is_pid(pid) and is_reference(ref) do
    send(pid, {:kuma_forgotten, ref, self()})
    :ok
  end

  @doc false
  # Kuma.erasure_status/2: single node, complete once erased and its events deleted; cluster mode, each node that
  # holds the entity's shard answers for itself (Kuma.Cluster.Purge.status/2).
  @spec status(Store.t(), binary()) :: {:ok, %{complete: boolean(), members: map()}} | {:error, term()}
  def status(%Store{cluster: nil} = s, id) do
    with {:ok, state} <- Kuma.Native.read_erasure(s.native, id) do
      status = %{nil => :not_applied, false => :pending, true => :done}[state]
      {:ok, %{complete: status == :done, members: %{node() => status}}}
    end
  end

  def status(%Store{} = s, id) do
    members = Kuma.Cluster.members(s.cluster, Kuma.Cluster.Route.shard(s, id))
    answers = :erpc.multicall(members, Kuma.Cluster.Purge, :status, [s.name, id], 5_000)

    statuses =
      Map.new(Enum.zip(members, answers), fn
        {node, {:ok, status}} when status in [:done, :pending, :not_applied] -> {node, status}
        {node, _} -> {node, :unreachable}
      end)

    {:ok, %{complete: members != [] and Enum.all?(Map.values(statuses), &(&1 == :done)), members: statuses}}
  end

  @doc false
  @spec delete(Store.t(), binary(), keyword()) :: {:ok, %{events_deleted: non_neg_integer()}} | {:error, term()}
  def delete(%Store{} = s, id, opts) do
    timeout = Keyword.get(opts, :timeout, @default_timeout)
    stop_entity(s, id)

    with {:ok, count} <- EventLog.erase(s, id, timeout) do
      stop_entity(s, id)
      stop_holders(s, id)
      :ets.match_delete(s.sensitive_refs, {:_, id})

      case notify(s, id, Keyword.get(opts, :forget_timeout, @default_forget_timeout)) do
        [] -> {:ok, %{events_deleted: count}}
        silent -> {:error, {:forget_unconfirmed, silent}}
      end
    end
  end

  # Stops a live entity process and waits until it is gone (its state leaves memory).
  defp stop_entity(s, id) do
    case Kuma.Entity.whereis(s, id) do
      nil -> :ok
      pid -> stop_process(pid)
    end
  end

  defp stop_process(pid) do
    GenServer.stop(pid, {:shutdown, :erased}, 5_000)
  catch
    :exit, _ -> :ok
  end

  # Live entities that revealed a sensitive value of the erased subject.
  defp stop_holders(s, subject) do
    for {_, holder} <- :ets.take(s.sensitive_refs, subject), holder != subject do
      stop_entity(s, holder)
    end

    :ok
  end

  # Sends {:kuma_forget, ...} to every listener; returns the pids that did not confirm.
  # Cluster mode: the listeners of every node (projections run where the cluster placed
  # them); a node that owns projections and cannot be reached is returned too.
  defp notify(%Store{cluster: nil} = s, id, timeout), do: notify_here(s, id, timeout)

  defp notify(%Store{cluster: c} = s, id, timeout) do
    others = Node.list()
    here = Task.async(fn -> notify_here(s, id, timeout) end)
    answers = :erpc.multicall(others, __MODULE__, :notify_here, [s.name, c.id, id, timeout], timeout + 1_000)
    silent = for {node, answer} <- Enum.zip(others, answers), do: silent_there(node, answer)
    unreached = Kuma.Cluster.Projections.owners(s.name) -- [node() | others]
    Task.await(here, :infinity) ++ List.flatten(silent) ++ unreached
  end

  defp silent_there(_node, {:ok, silent}) when is_list(silent), do: silent
  defp silent_there(node, _failed), do: [node]

  @doc false
  # Run on every node of a cluster by the node that erased an entity: this node's listeners.
  def notify_here(name, cluster_id, id, timeout) do
    case Store.lookup(name) do
      {:ok, %Store{cluster: %{id: ^cluster_id}} = s} -> notify_here(s, id, timeout)
      _ -> []
    end
  end

  defp notify_here(s, id, timeout) do
    listeners = Registry.lookup(Kuma.Listeners, {s.name, :forget})

    pending =
      Map.new(listeners, fn {pid, _} ->
        ref = Process.monitor(pid)
        send(pid, {:kuma_forget, s.name, id, {self(), ref}})
        {ref, pid}
      end)

    deadline = System.monotonic_time(:millisecond) + timeout
    collect(pending, deadline)
  end

  defp collect(pending, _deadline) when map_size(pending) == 0, do: []

  defp collect(pending, deadline) do
    left = max(deadline - System.monotonic_time(:millisecond), 0)

    receive do
      {:kuma_forgotten, ref, _pid} when is_map_key(pending, ref) ->
        Process.demonitor(ref, [:flush])
        collect(Map.delete(pending, ref), deadline)

      # A listener that died holds nothing any more.
      {:DOWN, ref, :process, _, _} when is_map_key(pending, ref) ->
        collect(Map.delete(pending, ref), deadline)
    after
      left ->
        Enum.each(Map.keys(pending), &Process.demonitor(&1, [:flush]))
        Map.values(pending)
    end
  end
end
