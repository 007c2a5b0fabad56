defmodule Kuma.Cluster.Boot do
  @moduledoc false
  # How a node joins its store's cluster when the store starts (Kuma.Store.Owner): start
  # the store's Raft system (files under <data_dir>/raft), connect to the seeds, run this
  # node's member of the metadata group (seeds only), agree on the cluster's identity
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
         :ok <- meta_member(engine, cluster),
         {:ok, identity} <- agree(engine, cluster, proposal(config), deadline),
         :ok <- check(identity, config),
         cluster = %{cluster | id: identity.cluster_id},
         {:ok, _status} <- register(cluster, deadline) do
      {:ok, cluster, identity.key}
    end
  end

  # Only seeds run members of the metadata group; a node that joins later reaches it
  # through them (Kuma.Cluster.Meta).
  defp meta_member(engine, cluster) do
    if node() in cluster.seeds,
      do: engine.ensure_member(cluster.system, Cluster.meta_group(cluster), {MetaMachine, %{}}, cluster.seeds, []),
      else: :ok
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
    if node() in cluster.seeds, do: Consensus.engine().stop_member(cluster.system, Cluster.meta_group(cluster))
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
  defp agree(engine, cluster, proposal, deadline, round \\ 0) do
    group = Cluster.meta_group(cluster)

    seed? = node() in cluster.seeds

    if seed? and ((round == 0 and node() == hd(cluster.seeds)) or (round >= 3 and :rand.uniform(3) == 1)) do
      engine.trigger_election(group)
    end

    via = if seed?, do: node(), else: Enum.at(cluster.seeds, rem(round, length(cluster.seeds)))
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
          agree(engine, cluster, proposal, deadline, round + 1)
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
