defmodule Kuma.Cluster.Boot do
  @moduledoc false
  # How a node joins its store's cluster when the store starts (Kuma.Store.Owner): start
  # the store's Raft system (files under <data_dir>/raft), connect to the seeds, run this
  # node's member of the metadata group (seeds, and nodes a leaving seed handed its member
  # to), agree on the cluster's identity
  # through it, and register this node among the cluster's nodes.
  # The first node to propose an identity sets it; every other node reads the same one and
  # is refused if its own settings differ. Waits for a majority of the seeds, at most
  # `:start_timeout`.

  require Logger

  alias Kuma.Cluster
  alias Kuma.Cluster.{Consensus, Meta, MetaMachine}

  @doc "Joins the cluster: `{:ok, cluster, key}` (the key of keyed hashes of ids) or an error."
  @spec join(map()) :: {:ok, Cluster.t(), binary()} | {:error, term()}
  def join(%{cluster: %Cluster{} = cluster} = config) do
    engine = Consensus.engine()
    deadline = System.monotonic_time(:millisecond) + cluster.start_timeout

    with :ok <- ra_available(engine),
         :ok <- engine.start_system(cluster.system, Path.join(config.data_dir, "raft")),
         _ = connect(cluster.seeds),
         {:ok, member?} <- meta_member(engine, cluster),
         {:ok, identity} <- agree(engine, cluster, member?, proposal(config), deadline),
         :ok <- check(identity, config),
         cluster = %{cluster | id: identity.cluster_id},
         {:ok, _status} <- register(cluster, deadline) do
      {:ok, cluster, identity.key}
    end
  end

  # Whether this node runs a member of the metadata group, started here if so: one it ran
  # before (a seed, or a node a leaving seed handed its member to), or, on a seed that has
  # none, a new one (founding the cluster), unless the cluster exists and this seed has
  # left it (then it joins as any node). Other nodes reach the group through its members
  # (Kuma.Cluster.Meta).
  defp meta_member(engine, cluster) do
    group = Cluster.meta_group(cluster)

    start? =
      cond do
        group in engine.local_groups(cluster.system) -> true
        node() not in cluster.seeds -> false
        true -> not left_earlier?(cluster)
      end

    if start? do
      with :ok <- engine.ensure_member(cluster.system, group, {MetaMachine, %{}}, cluster.seeds, []), do: {:ok, true}
    else
      {:ok, false}
    end
  end

  # A seed without a member of the metadata group: did it leave a cluster that goes on?
  # (If no other seed answers, it is founding one, or its data dir was lost: it starts a
  # member as the seed it is.)
  defp left_earlier?(cluster) do
    case Meta.view(%{cluster | seeds: cluster.seeds -- [node()]}, 1_000) do
      {:ok, %{identity: %{}, meta_members: members}} -> node() not in members
      _ -> false
    end
  end

  @doc """
  Run on the node that takes over a leaving node's member of the metadata group: starts a
  member here that knows `members` (it is added to the group next, and catches up).
  """
  @spec add_meta_member(atom(), [node()]) :: :ok | {:error, term()}
  def add_meta_member(store, members) do
    with {:ok, s} <- Kuma.Store.lookup(store) do
      Consensus.engine().ensure_member(s.cluster.system, Cluster.meta_group(s.cluster), {MetaMachine, %{}}, members, [])
    end
  end

  # This node among the cluster's nodes (a node that is not a seed joins here; shards then
  # move to it, Kuma.Cluster.Rebalancer).
  defp register(cluster, deadline) do
    case Meta.command(cluster, {:register, node()}) do
      {:ok, status} ->
        {:ok, status}

      other ->
        if System.monotonic_time(:millisecond) >= deadline do
          {:error, {:cluster_not_formed, "could not register this node: #{inspect(other)}"}}
        else
          Process.sleep(200)
          register(cluster, deadline)
        end
    end
  end

  @doc "Stops this node's metadata member, if it runs one (when the store stops)."
  def leave(%Cluster{} = cluster) do
    engine = Consensus.engine()
    group = Cluster.meta_group(cluster)
    if group in engine.local_groups(cluster.system), do: engine.stop_member(cluster.system, group)
    :ok
  end

  defp ra_available(engine) do
    case engine.available() do
      :ok -> :ok
      {:error, why} -> {:error, {:ra_missing, why}}
    end
  end

  defp connect(seeds), do: for(seed <- seeds, seed != node(), do: Node.connect(seed))

  # The identity this node would give a new cluster, and where the shards would start:
  # placed on the seeds.
  defp proposal(config) do
    id = Base.encode16(:crypto.strong_rand_bytes(16), case: :lower)
    %{seeds: seeds, replicas: replicas} = config.cluster

    %{
      cluster_id: id,
      key: :crypto.strong_rand_bytes(32),
      shards: config.shards,
      replicas: replicas,
      seeds: seeds,
      encrypted: config.encryption,
      shard_members: Map.new(0..(config.shards - 1), &{&1, Cluster.placement(id, seeds, &1, replicas)})
    }
  end

  # No leader yet (a new group, or all members restarted): the first seed stands for
  # election at once, the others after a few unanswered rounds (jittered), so that a group
  # whose first seed is down still elects one.
  defp agree(engine, cluster, member?, proposal, deadline, round \\ 0) do
    group = Cluster.meta_group(cluster)

    if member? and ((round == 0 and node() == hd(cluster.seeds)) or (round >= 3 and :rand.uniform(3) == 1)) do
      engine.trigger_election(group)
    end

    via = if member?, do: node(), else: Enum.at(cluster.seeds, rem(round, length(cluster.seeds)))
    # A new cluster is created only while every seed runs its metadata member: a majority
    # of seeds started on fresh data dirs while another seed is away never founds a second
    # cluster (it waits for that seed); an existing cluster is joined with any majority.
    reachable = Enum.count(cluster.seeds, &engine.running?(group, &1))
    offer = if reachable == length(cluster.seeds), do: proposal, else: :existing

    case engine.command(group, via, {:join, offer}, 2_000) do
      {:ok, {:ok, identity}, _leader} ->
        {:ok, identity}

      other ->
        if System.monotonic_time(:millisecond) >= deadline do
          {:error,
           {:cluster_not_formed,
            "#{reachable} of #{length(cluster.seeds)} seeds running: a new cluster needs all of them, " <>
              "an existing one a majority (last answer: #{inspect(other)})"}}
        else
          connect(cluster.seeds)
          Process.sleep(200)
          agree(engine, cluster, member?, proposal, deadline, round + 1)
        end
    end
  end

  defp check(identity, config) do
    ours = %{
      shards: config.shards,
      replicas: config.cluster.replicas,
      seeds: config.cluster.seeds,
      encrypted: config.encryption
    }

    case Enum.find([:shards, :replicas, :seeds, :encrypted], &(Map.get(identity, &1) != Map.get(ours, &1))) do
      nil ->
        :ok

      key ->
        {:error,
         {:cluster_mismatch,
          "the cluster has #{key} #{inspect(Map.get(identity, key))}, this node was started with #{inspect(Map.get(ours, key))}"}}
    end
  end
end
