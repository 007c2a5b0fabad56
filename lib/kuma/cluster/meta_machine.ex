defmodule Kuma.Cluster.MetaMachine do
  @moduledoc false
  # The Raft state machine of a store's metadata group (one member per seed):
  #
  #   identity  %{cluster_id, key, shards, replicas, seeds, encrypted}: set by the first
  #             node to propose one; every node checks its own settings against it
  #             (Kuma.Cluster.Boot). `key` keys the hashes that stand for entity ids in
  #             shards and keystores: the same on every node, so every replica of a shard
  #             finds an entity at the same place.
  #   nodes     node => :active | :leaving. The seeds from the start, other nodes once they
  #             register. Shards are placed on active nodes (Kuma.Cluster.placement/4);
  #             a leaving node's shards move away, then it is forgotten; a node down
  #             longer than `:replace_after` is removed, and its shards rebuilt elsewhere.
  #   shards    shard => its members as last recorded: where each node finds the shards it
  #             must run at start, and where any node asks for a shard's leader. Raft's own
  #             membership of the shard's group is the truth; this follows it (every
  #             change of it is recorded here by Kuma.Cluster.Rebalancer right after).
  #   moves     shard => %{from, to, since}: moves under way (for `Kuma.cluster_info/1`, and
  #             so that a member being added is not taken for a stale one).
  @behaviour :ra_machine

  @impl :ra_machine
  def init(_config), do: %{identity: nil, nodes: %{}, shards: %{}, moves: %{}}

  @impl :ra_machine
  def apply(_meta, {:join, :existing}, %{identity: nil} = state), do: {state, {:error, :not_formed}}

  def apply(_meta, {:join, proposed}, %{identity: nil} = state) do
    {members, identity} = Map.pop(proposed, :shard_members, %{})
    nodes = Map.new(identity.seeds, &{&1, :active})
    {%{state | identity: identity, nodes: nodes, shards: members}, {:ok, identity}}
  end

  def apply(_meta, {:join, _proposed}, %{identity: identity} = state), do: {state, {:ok, identity}}

  def apply(_meta, {:register, node}, %{identity: %{}} = state) do
    nodes = Map.put_new(state.nodes, node, :active)
    {%{state | nodes: nodes}, {:ok, Map.fetch!(nodes, node)}}
  end

  def apply(_meta, {:leave, node}, %{identity: %{} = identity} = state) do
    active = for {n, :active} <- state.nodes, do: n

    cond do
      not Map.has_key?(state.nodes, node) ->
        {state, {:error, :not_a_member}}

      node in identity.seeds ->
        {state, {:error, :seed}}

      state.nodes[node] == :active and length(active) - 1 < identity.replicas ->
        {state, {:error, {:too_few_nodes, length(active) - 1, identity.replicas}}}

      true ->
        {%{state | nodes: Map.put(state.nodes, node, :leaving)}, :ok}
    end
  end

  def apply(_meta, {:forget, node}, %{identity: %{}} = state) do
    holding = for {shard, members} <- state.shards, node in members, do: shard

    if holding == [] do
      {%{state | nodes: Map.delete(state.nodes, node)}, :ok}
    else
      {state, {:error, {:still_holds, holding}}}
    end
  end

  # A node down longer than the grace period (Kuma.Cluster.Rebalancer): no longer a place
  # for shards, unless that leaves fewer active nodes than replicas. It registers again
  # when it comes back.
  def apply(_meta, {:remove_node, node}, %{identity: %{} = identity} = state) do
    active = for {n, :active} <- state.nodes, n != node, do: n

    if length(active) < identity.replicas,
      do: {state, {:error, {:too_few_nodes, length(active), identity.replicas}}},
      else: {%{state | nodes: Map.delete(state.nodes, node)}, :ok}
  end

  def apply(_meta, {:members, shard, members}, %{identity: %{}} = state),
    do: {%{state | shards: Map.put(state.shards, shard, members)}, :ok}

  def apply(_meta, {:move, shard, nil}, %{identity: %{}} = state),
    do: {%{state | moves: Map.delete(state.moves, shard)}, :ok}

  def apply(_meta, {:move, shard, move}, %{identity: %{}} = state),
    do: {%{state | moves: Map.put(state.moves, shard, move)}, :ok}

  def apply(_meta, _other, state), do: {state, {:error, :unknown_command}}

  @doc false
  # A query (run on the leader): the whole state.
  def view(state), do: state
end
