defmodule Kuma.Cluster.Shards do
  @moduledoc false
  # Cluster mode: this node's members of the store's shard groups. Runs them (recovered
  # from their files or new), and follows which shards this node leads: a shard it leads
  # gets a proposer (Kuma.Cluster.Proposer) and a route entry pointing here; a shard it
  # stops leading loses both, and its entity processes here are stopped, so that entities
  # of a shard live on its leader only (their next call is routed to the new one, where
  # they load from that node's copy, which holds every write acknowledged before).
  use GenServer

  require Logger

  alias Kuma.{Cluster, Native, Store}
  alias Kuma.Cluster.{Consensus, Proposer, ShardMachine}

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

  @impl true
  def init(name) do
    Process.flag(:trap_exit, true)
    {:ok, s} = Store.lookup(name)
    cluster = s.cluster
    engine = Consensus.engine()

    started =
      Enum.reduce_while(Cluster.local_shards(cluster, s.shards), :ok, fn shard, :ok ->
        machine = {ShardMachine, %{store: name, shard: shard, snapshot_every: cluster.snapshot_every}}

        group = Cluster.shard_group(cluster, shard)
        opts = [snapshot_interval: cluster.snapshot_every]

        case engine.ensure_member(cluster.system, group, machine, Cluster.members(cluster, shard), opts) do
          :ok -> {:cont, :ok}
          {:error, reason} -> {:halt, {:error, {:shard_member_failed, shard, reason}}}
        end
      end)

    case started do
      :ok ->
        # Each shard's first member stands for election (a new group elects no leader by
        # itself); roles may have been told before this process ran (a restart): ask.
        for shard <- Cluster.local_shards(cluster, s.shards), hd(Cluster.members(cluster, shard)) == node() do
          engine.trigger_election(Cluster.shard_group(cluster, shard))
        end

        send(self(), :refresh)
        :ok = :net_kernel.monitor_nodes(true)
        {:ok, %{store: name, leading: MapSet.new(), leaderless: %{}, restarting: %{}}}

      {:error, reason} ->
        {:stop, reason}
    end
  end

  @impl true
  def handle_info({:role, shard, :leader}, st), do: {:noreply, lead(st, shard)}
  def handle_info({:role, shard, _other}, st), do: {:noreply, step_down(st, shard)}

  # Every second: this node's role in each of its shards, and an election where a shard
  # has had no leader for two checks running (all its members restarted, or the first
  # member is down); a member that leads is started as leader here if not yet.
  def handle_info(:refresh, st) do
    {:ok, s} = Store.lookup(st.store)
    engine = Consensus.engine()

    st =
      Enum.reduce(Cluster.local_shards(s.cluster, s.shards), st, fn shard, st ->
        group = Cluster.shard_group(s.cluster, shard)

        # A member that stopped (ra gave up restarting it: a copy it could not take, say)
        # is started again.
        if Process.whereis(group) == nil do
          machine = {ShardMachine, %{store: st.store, shard: shard, snapshot_every: s.cluster.snapshot_every}}
          members = Cluster.members(s.cluster, shard)

          _ =
            engine.ensure_member(s.cluster.system, group, machine, members, snapshot_interval: s.cluster.snapshot_every)
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
    engine = Consensus.engine()
    group = Cluster.shard_group(s.cluster, shard)
    engine.stop_member(s.cluster.system, group)
    _ = Native.cluster_replica_reset(s.native, shard)
    machine = {ShardMachine, %{store: st.store, shard: shard, snapshot_every: s.cluster.snapshot_every}}

    opts = [snapshot_interval: s.cluster.snapshot_every]

    case engine.ensure_member(s.cluster.system, group, machine, Cluster.members(s.cluster, shard), opts) do
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

  defp lead(st, shard) do
    {:ok, s} = Store.lookup(st.store)
    :ets.insert(s.cluster.routes, {shard, node()})

    if MapSet.member?(st.leading, shard) do
      st
    else
      _ = DynamicSupervisor.start_child(Store.via(st.store, :proposers), {Proposer, {st.store, shard}})
      %{st | leading: MapSet.put(st.leading, shard)}
    end
  end

  defp step_down(st, shard) do
    with {:ok, s} <- Store.lookup(st.store) do
      :ets.match_delete(s.cluster.routes, {shard, node()})

      if MapSet.member?(st.leading, shard) do
        Proposer.stop(st.store, shard)
        stop_entities(s, shard)
      end
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

      for shard <- Cluster.local_shards(s.cluster, s.shards) do
        engine.stop_member(s.cluster.system, Cluster.shard_group(s.cluster, shard))
      end
    end

    :ok
  end
end
