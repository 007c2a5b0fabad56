defmodule Kuma.Cluster.ShardMachine do
  @moduledoc false
  # The Raft state machine of one shard. Its real state is the shard's file on each member:
  # applying a log entry hands its prepared commands to this node's shard writer, which
  # writes them together with the entry's index (kuma_core's replica module), so a replay
  # after a restart writes nothing twice.
  #
  # Apply does not wait for the disk: it queues the entry and returns, and the writer
  # commits the entries queued meanwhile in one transaction (group commit across Raft
  # entries; the ra process goes on with the protocol). The entry names its proposer
  # (`{pid, ref}`): on the leader's node that proposer is told the outcomes once they are
  # committed, and only then answers its callers. A crash before that commit loses nothing:
  # the entry is in Raft's log, and applying it again after the restart writes it.
  #
  # A member whose writer could not apply an entry (its disk full) refuses every later one
  # until Kuma.Cluster.Shards restarts it, which applies them again, in order, from the log.
  # Entries at or below the index the shard file already holds are skipped without a call
  # to the writer (a restart replays the whole log).
  #
  # Becoming leader or ceasing to be one is told to Kuma.Cluster.Shards, which starts or
  # stops the shard's proposer and entity processes on this node.
  @behaviour :ra_machine

  alias Kuma.{Native, Store}

  @impl :ra_machine
  def init(%{store: store, shard: shard} = config),
    do: %{store: store, shard: shard, every: Map.get(config, :snapshot_every, 5_000), since: 0}

  # Every `every` entries, a snapshot at this one (Kuma.Cluster.ShardSnapshot): ra then
  # truncates its log up to it. The reply names the entry's term: a proposer's first entry
  # (its barrier) tells it the term it leads in (Kuma.Cluster.ReadGate confirms reads by
  # it).
  #
  # An entry with an erasure starts a purge of the log on this member (Kuma.Cluster.Purge),
  # and while one is pending, every entry past it offers a snapshot too (release_cursor is
  # one of the effects ra runs on every member).
  @impl :ra_machine
  def apply(%{index: index, term: term}, {:batch, commands, reply_to}, state) do
    reply = {queue(state, index, commands, reply_to), term}
    since = state.since + 1

    # (Called here, not as an effect: ra runs a machine's effects on the leader only.)
    erase? = Enum.any?(commands, &match?({:kuma_erase, _, _, _}, &1))
    if erase?, do: Kuma.Cluster.Purge.erased(state.store, state.shard, index)

    if since >= state.every or (not erase? and Kuma.Cluster.Purge.due?(state.store, state.shard, index)) do
      state = %{state | since: 0}
      {state, reply, [{:release_cursor, index, state}]}
    else
      {%{state | since: since}, reply}
    end
  end

  def apply(_meta, _other, state), do: {state, {:error, :unknown_command}}

  @impl :ra_machine
  def snapshot_module, do: Kuma.Cluster.ShardSnapshot

  @impl :ra_machine
  def state_enter(role, %{store: store, shard: shard}),
    do: [{:mod_call, Kuma.Cluster.Shards, :role_changed, [store, shard, role]}]

  defp queue(%{store: name, shard: shard}, index, commands, reply_to) do
    with {:ok, s} <- Store.lookup(name),
         false <- index <= applied(s, shard),
         {pid, ref} = local(reply_to),
         apply = apply_nif(commands),
         {:ok, :ok} <- apply.(s.native, shard, index, commands, pid, ref, Store.whereis(name, :cluster)) do
      :queued
    else
      true -> :applied_before
      {:error, reason} -> exit({:kuma_apply_failed, shard, index, reason})
    end
  end

  # Large entries are decoded on a dirty scheduler, as local writes are.
  defp apply_nif(commands) do
    {count, bytes} =
      Kuma.Cluster.Proposer.size(for {:kuma_prepared, _, _, _, _, _, _, _, events} <- commands, e <- events, do: e)

    if Kuma.EventLog.dirty?(count, bytes), do: &Native.cluster_apply_dirty/7, else: &Native.cluster_apply/7
  end

  # The proposer is told by the writer of its own node only (a pid of a previous run of
  # this node, in an entry applied again after a restart, is no one to tell).
  defp local({pid, ref}) when is_pid(pid) and node(pid) == node() do
    if Process.alive?(pid), do: {pid, ref}, else: {nil, nil}
  rescue
    ArgumentError -> {nil, nil}
  end

  defp local(_other), do: {nil, nil}

  # The index the shard file held when this member (re)started: read once per ra process.
  defp applied(s, shard) do
    case Process.get({:kuma_applied, shard}) do
      nil ->
        index =
          case Native.cluster_applied_index(s.native, shard) do
            {:ok, index} -> index
            {:error, reason} -> exit({:kuma_apply_failed, shard, 0, reason})
          end

        Process.put({:kuma_applied, shard}, index)
        index

      index ->
        index
    end
  end
end
