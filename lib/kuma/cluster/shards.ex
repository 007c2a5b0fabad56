defmodule Kuma.Cluster.Shards do
  @moduledoc false
  # Cluster mode: this node's members of the store's shard groups. Runs them (recovered
  # from their files, or new), and follows which shards this node leads: a shard it leads
  # gets a proposer (Kuma.Cluster.Proposer) and a route entry pointing here; a shard it
  # stops leading loses both, and its entity processes here are stopped, so that entities
  # of a shard live on its leader only (their next call is routed to the new one, where
  # they load from that node's copy, which holds every write acknowledged before).
  #
  # Which shards this node holds changes when shards move (Kuma.Cluster.Rebalancer): a move
  # adds a member here (`add_local/3`) or drops one (`drop_local/2`: the member, its Raft
  # files, and this node's copy of the shard with its entities' keys go). A member this node
  # still runs for a shard whose group no longer counts it (it was removed while this node
  # was down) is dropped the same way when found.
  use GenServer

  require Logger

  alias Kuma.{Cluster, Native, Store}
  alias Kuma.Cluster.{Consensus, Meta, Proposer, ShardMachine}

  def start_link(name), do: GenServer.start_link(__MODULE__, name, name: Store.via(name, :cluster))

  @doc "Called by a shard's state machine (in its ra process) when its role on this node changes."
  def role_changed(store, shard, role) do
    case Store.whereis(store, :cluster) do
      pid when is_pid(pid) -> send(pid, {:role, shard, role})
      nil -> :ok
    end

    :ok
  end

  @doc "Whether this node leads `shard` (and its proposer runs)."
  @spec leader?(Store.t(), non_neg_integer()) :: boolean()
  def leader?(%Store{cluster: %{routes: routes}}, shard), do: :ets.lookup(routes, shard) == [{shard, node()}]

  @doc """
  Runs a member of `shard` on this node, for a move that adds this node to the shard's
  group: `members` are the group's members with this node. It catches up once added.
  """
  @spec add_local(atom(), non_neg_integer(), [node()]) :: :ok | {:error, term()}
  def add_local(name, shard, members),
    do: GenServer.call(Store.via(name, :cluster), {:add_local, shard, members}, 60_000)

  @doc """
  This node no longer holds `shard` (a move removed it from the group): its member stops,
  its Raft files are deleted, and its copy of the shard is emptied, its entities' keys
  deleted (they live on in the other members).
  """
  @spec drop_local(atom(), non_neg_integer()) :: :ok | {:error, term()}
  def drop_local(name, shard), do: GenServer.call(Store.via(name, :cluster), {:drop_local, shard}, 120_000)

  @doc "The shards this node runs a member of."
  @spec local(atom()) :: [non_neg_integer()]
  def local(name), do: GenServer.call(Store.via(name, :cluster), :local)

  @impl true
  def init(name) do
    Process.flag(:trap_exit, true)
    {:ok, s} = Store.lookup(name)
    cluster = s.cluster

    with {:ok, view} <- Meta.view(cluster),
         :ok <- learn(cluster, view),
         registered = MapSet.new(Consensus.engine().local_groups(cluster.system)),
         has? = &(Cluster.shard_group(cluster, &1) in registered),
         local =
           for(shard <- 0..(s.shards - 1), mine?(view, shard) or (has?.(shard) and coming?(view, shard)), do: shard),
         # Members of groups this node was removed from while it was down (replaced, or a
         # move that finished without it): their files go before anything starts.
         _ = for(shard <- 0..(s.shards - 1), has?.(shard), shard not in local, do: delete_stale(s, shard)),
         :ok <- start_members(name, s, view, local) do
      release_leftovers(s, local)
      send(self(), :refresh)
      :ok = :net_kernel.monitor_nodes(true)
      {:ok, %{store: name, local: MapSet.new(local), leading: MapSet.new(), leaderless: %{}, restarting: %{}}}
    else
      {:error, reason} -> {:stop, reason}
    end
  end

  defp mine?(view, shard), do: node() in Map.get(view.shards, shard, [])
  defp coming?(view, shard), do: match?(%{to: to} when to == node(), Map.get(view.moves, shard))

  defp delete_stale(s, shard) do
    Logger.info("shard #{shard}: this node no longer holds it; deleting its old member")
    Consensus.engine().delete_member(s.cluster.system, Cluster.shard_group(s.cluster, shard))
  end

  # The members of every shard, as the metadata group has them, for routing.
  defp learn(cluster, view) do
    for {shard, members} <- view.shards, do: Cluster.put_members(cluster, shard, members)
    Cluster.put_meta_members(cluster, view.meta_members)
    :ok
  end

  defp start_members(name, s, view, shards) do
    engine = Consensus.engine()

    started =
      Enum.reduce_while(shards, :ok, fn shard, :ok ->
        case ensure(name, s, shard, Map.get(view.shards, shard, [node()])) do
          :ok -> {:cont, :ok}
          {:error, reason} -> {:halt, {:error, {:shard_member_failed, shard, reason}}}
        end
      end)

    # Each shard's first member stands for election (a new group elects no leader by
    # itself); roles may have been told before this process ran (a restart): asked below.
    if started == :ok do
      for shard <- shards,
          List.first(Map.get(view.shards, shard, [])) == node(),
          do: engine.trigger_election(Cluster.shard_group(s.cluster, shard))
    end

    started
  end

  defp ensure(name, s, shard, members) do
    machine = {ShardMachine, %{store: name, shard: shard, snapshot_every: s.cluster.snapshot_every}}
    opts = [snapshot_interval: s.cluster.snapshot_every]
    Consensus.engine().ensure_member(s.cluster.system, Cluster.shard_group(s.cluster, shard), machine, members, opts)
  end

  # Copies of shards this node no longer holds, left by a move that stopped between
  # removing this node and emptying its copy (a crash): emptied now.
  defp release_leftovers(s, local) do
    for shard <- 0..(s.shards - 1), shard not in local do
      case Native.cluster_applied_index(s.native, shard) do
        {:ok, applied} when applied > 0 -> release(s, shard)
        _ -> :ok
      end
    end
  end

  defp release(s, shard) do
    case Native.cluster_release(s.native, shard) do
      {:ok, keys} ->
        Logger.info("shard #{shard}: moved away from this node; its copy here is emptied (#{keys} keys deleted)")
        :ok

      {:error, reason} ->
        Logger.error("shard #{shard}: emptying this node's copy failed: #{Kuma.Error.format(reason)}")
        {:error, reason}
    end
  end

  @impl true
  def handle_call({:add_local, shard, members}, _from, st) do
    {:ok, s} = Store.lookup(st.store)

    case ensure(st.store, s, shard, members) do
      :ok -> {:reply, :ok, %{st | local: MapSet.put(st.local, shard)}}
      error -> {:reply, error, st}
    end
  end

  def handle_call({:drop_local, shard}, _from, st) do
    {:ok, s} = Store.lookup(st.store)
    {reply, st} = drop(st, s, shard)
    {:reply, reply, st}
  end

  def handle_call(:local, _from, st), do: {:reply, Enum.sort(st.local), st}

  defp drop(st, s, shard) do
    st = step_down(st, shard)

    with :ok <- Consensus.engine().delete_member(s.cluster.system, Cluster.shard_group(s.cluster, shard)),
         :ok <- release(s, shard) do
      {:ok, %{st | local: MapSet.delete(st.local, shard), leaderless: Map.delete(st.leaderless, shard)}}
    else
      error -> {error, st}
    end
  end

  @impl true
  def handle_info({:role, shard, :leader}, st), do: {:noreply, lead(st, shard)}
  def handle_info({:role, shard, _other}, st), do: {:noreply, step_down(st, shard)}

  # Every second: the shards' members from the metadata group; this node's role in each of
  # its shards, and an election where a shard has had no leader for two checks running
  # (all its members restarted, or the first member is down); a member that leads is
  # started as leader here if not yet; a member the group no longer counts is dropped.
  def handle_info(:refresh, st) do
    {:ok, s} = Store.lookup(st.store)
    engine = Consensus.engine()
    # The metadata group is asked from another process: its leader may be a node that just
    # died, and role changes must not wait behind that call.
    me = self()
    Task.start(fn -> send(me, {:view, Meta.view(s.cluster, 2_000)}) end)
    # Erasures still in Raft's files here (Kuma.Cluster.Purge), also from a task: it may
    # ask Raft for a leader.
    local = st.local
    Task.start(fn -> Kuma.Cluster.Purge.check(s, local) end)

    st =
      Enum.reduce(st.local, st, fn shard, st ->
        group = Cluster.shard_group(s.cluster, shard)

        # A member that stopped (ra gave up restarting it: a copy it could not take, say)
        # is started again.
        if Process.whereis(group) == nil and not Map.has_key?(st.restarting, shard) do
          _ = ensure(st.store, s, shard, Cluster.members(s.cluster, shard))
        end

        case engine.leader(group, node(), 500) do
          {:ok, leader} when leader == node() ->
            lead(%{st | leaderless: Map.delete(st.leaderless, shard)}, shard)

          {:ok, _other} ->
            %{st | leaderless: Map.delete(st.leaderless, shard)}

          {:error, _} ->
            misses = Map.get(st.leaderless, shard, 0) + 1
            if misses >= 2 and :rand.uniform(2) == 1, do: engine.trigger_election(group)
            %{st | leaderless: Map.put(st.leaderless, shard, misses)}
        end
      end)

    Process.send_after(self(), :refresh, 1_000)
    {:noreply, st}
  end

  def handle_info({:view, {:ok, view}}, st) do
    {:ok, s} = Store.lookup(st.store)
    :ok = learn(s.cluster, view)
    {:noreply, drop_stale(st, s, view)}
  end

  def handle_info({:view, _error}, st), do: {:noreply, st}

  # A member that could not apply an entry (see Kuma.Cluster.ShardMachine) is restarted,
  # once, after its writer is reset: it applies the entries again from the log.
  def handle_info({:kuma_apply_failed, shard, index, reason}, st) do
    if Map.has_key?(st.restarting, shard) do
      {:noreply, st}
    else
      Logger.warning(
        "shard #{shard}: applying Raft entry #{index} failed (#{Kuma.Error.format(reason)}); restarting its member"
      )

      Process.send_after(self(), {:restart_member, shard}, 500)
      {:noreply, %{st | restarting: Map.put(st.restarting, shard, true)}}
    end
  end

  def handle_info({:restart_member, shard}, st) do
    {:ok, s} = Store.lookup(st.store)
    Consensus.engine().stop_member(s.cluster.system, Cluster.shard_group(s.cluster, shard))
    _ = Native.cluster_replica_reset(s.native, shard)

    case ensure(st.store, s, shard, Cluster.members(s.cluster, shard)) do
      :ok ->
        {:noreply, %{st | restarting: Map.delete(st.restarting, shard)}}

      {:error, _} ->
        Process.send_after(self(), {:restart_member, shard}, 2_000)
        {:noreply, st}
    end
  end

  # A member's node came back (a restart, a healed partition): Raft replicates to a member
  # only when its leader has an entry to send, so each shard led here commits an empty one,
  # and the member catches up (from a snapshot if the log no longer reaches back to it).
  def handle_info({:nodeup, node}, st) do
    {:ok, s} = Store.lookup(st.store)

    for shard <- st.leading, node in Cluster.members(s.cluster, shard) do
      Proposer.nudge(st.store, shard)
    end

    {:noreply, st}
  end

  def handle_info(_other, st), do: {:noreply, st}

  # Members here of shards that the metadata group places elsewhere, with no move bringing
  # them here: dropped if their group, asked, does not count this node.
  defp drop_stale(st, s, view) do
    Enum.reduce(st.local, st, fn shard, st ->
      members = Map.get(view.shards, shard, [])

      with false <- node() in members or coming?(view, shard) or members == [],
           {:ok, actual, _leader} <-
             Consensus.engine().members(Cluster.shard_group(s.cluster, shard), Enum.random(members), 2_000),
           false <- node() in actual do
        Logger.info("shard #{shard}: this node's member was removed from its group; dropping it")
        {_, st} = drop(st, s, shard)
        st
      else
        _ -> st
      end
    end)
  end

  # The proposer enters this node as the shard's route once its barrier is applied: until
  # then this node's copy may lack entries the previous leader committed, and calls get
  # `:not_leader` (and are retried) rather than a stale read.
  defp lead(st, shard) do
    if MapSet.member?(st.leading, shard) do
      st
    else
      _ = DynamicSupervisor.start_child(Store.via(st.store, :proposers), {Proposer, {st.store, shard}})
      %{st | leading: MapSet.put(st.leading, shard)}
    end
  end

  defp step_down(st, shard) do
    with {:ok, s} <- Store.lookup(st.store) do
      # The proposer first: it could otherwise enter the route again after it is removed.
      if MapSet.member?(st.leading, shard), do: Proposer.stop(st.store, shard)
      Kuma.Cluster.Route.leave_self(s, shard)
      if MapSet.member?(st.leading, shard), do: stop_entities(s, shard)
    end

    %{st | leading: MapSet.delete(st.leading, shard)}
  end

  # The shard's live entities here hold state this node no longer owns.
  defp stop_entities(s, shard) do
    for {id, pid, _, _, _, _} <- :ets.tab2list(s.entities), Native.store_shard_for(s.native, id) == shard do
      :ets.match_delete(s.entities, {id, pid, :_, :_, :_, :_})
      Process.exit(pid, {:shutdown, :not_leader})
    end
  end

  @impl true
  def terminate(_reason, st) do
    with {:ok, s} <- Store.lookup(st.store) do
      engine = Consensus.engine()
      for shard <- st.local, do: engine.stop_member(s.cluster.system, Cluster.shard_group(s.cluster, shard))
    end

    :ok
  end
end
