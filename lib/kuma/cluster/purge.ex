defmodule Kuma.Cluster.Purge do
  @moduledoc false
  # Cluster mode: erasure through Raft's own files. An erasure is a log entry, and the log
  # also holds the erased entity's earlier entries: its id, its sealed events and its data
  # key (wrapped by the master key, for members that did not have it). Erasing the shard
  # copy and the keystore on every member is not enough while those entries are still in
  # the engine's files, so every member, once it has applied the erasure:
  #
  #   1. notes the erasure's index and has the engine start pushing older entries out of
  #      its files (ra: its write-ahead log rolls over, `Kuma.Cluster.Consensus`
  #      `purge_begin`);
  #   2. offers a snapshot at every entry it applies past that point
  #      (Kuma.Cluster.ShardMachine), so the log is truncated past the erasure;
  #   3. checks every second (Kuma.Cluster.Shards) whether its files still hold an entry at
  #      or below the erasure's index; until they do not, the shard's leader is asked for an
  #      empty entry now and then, so a shard with no writes after the erasure gets there
  #      too. Then the purge is done.
  #
  # The pending purges live in the store's route table, by shard (the latest erasure's
  # index; it covers the earlier ones). They are not kept across a restart: a member that
  # restarts replays its log, applies the erasure again if it is still there, and begins
  # again. `status/2` is what `Kuma.erasure_status/2` asks each member.
  alias Kuma.{Cluster, Native, Store}
  alias Kuma.Cluster.{Consensus, Proposer, Route}

  @doc """
  In a member's Raft process, after it applied an entry with an erasure at `index`, or
  took a snapshot at `index` (which may hold erasures it never applied from the log): from
  now on, entries at or below `index` are to leave this member's Raft files.
  """
  @spec erased(atom(), non_neg_integer(), non_neg_integer()) :: :ok
  def erased(store, shard, index) do
    with {:ok, %Store{cluster: c}} <- Store.lookup(store) do
      token = Consensus.engine().purge_begin(c.system, Cluster.shard_group(c, shard))
      :ets.insert(c.routes, {{:purge, shard}, index, token})
    end

    :ok
  end

  @doc """
  Whether the member should offer a snapshot at `index`: a purge of `shard` is pending and
  `index` lies past what its log held when the purge began.
  """
  @spec due?(atom(), non_neg_integer(), non_neg_integer()) :: boolean()
  def due?(store, shard, index) do
    case Store.lookup(store) do
      {:ok, %Store{cluster: c}} ->
        case :ets.lookup(c.routes, {:purge, shard}) do
          [{_, _erased, %{upto: upto}}] -> index > upto
          [] -> false
        end

      _ ->
        false
    end
  end

  @doc """
  Checks this node's pending purges (`shards`: the shards it holds): a done one is
  removed; for one not done yet, the shard's leader is asked for an empty entry.
  """
  @spec check(Store.t(), Enumerable.t()) :: :ok
  def check(%Store{cluster: c} = s, shards) do
    for shard <- shards, [{_, index, token}] <- [:ets.lookup(c.routes, {:purge, shard})] do
      if Consensus.engine().purged?(c.system, Cluster.shard_group(c, shard), index, token) do
        # Unless a newer erasure began a purge of its own meanwhile.
        :ets.delete_object(c.routes, {{:purge, shard}, index, token})
      else
        nudge(s, shard)
      end
    end

    :ok
  end

  defp nudge(s, shard) do
    case Route.leader(s, shard) do
      {:ok, node} when node == node() -> Proposer.nudge(s.name, shard)
      {:ok, node} -> :erpc.cast(node, Proposer, :nudge, [s.name, shard])
      _ -> :ok
    end
  end

  @doc """
  This member's view of the erasure of `entity_id`: `:done` (erased, its events deleted
  from the shard, and no Raft file here holds an entry from before the erasure), `:pending`
  (erased, events or Raft's files not clean yet), or `:not_applied` (this member has not
  applied the erasure).
  """
  @spec status(atom(), binary()) :: :done | :pending | :not_applied | {:error, term()}
  def status(store, entity_id) do
    with {:ok, %Store{cluster: c} = s} <- Store.lookup(store),
         {:ok, state} <- Native.read_erasure(s.native, entity_id) do
      shard = Route.shard(s, entity_id)

      cond do
        state == nil -> :not_applied
        state == false -> :pending
        :ets.member(c.routes, {:purge, shard}) -> :pending
        true -> :done
      end
    end
  end
end
