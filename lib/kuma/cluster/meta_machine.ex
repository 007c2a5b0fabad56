defmodule Kuma.Cluster.MetaMachine do
  @moduledoc false
  # The Raft state machine of a store's metadata group (one member per seed):
  #
  #   identity  %{cluster_id, key, shards, replicas, seeds, encrypted}: set by the first
  #             node to propose one; every node checks its own settings against it
  #             (Kuma.Cluster.Boot). `key` keys the hashes that stand for entity ids in
  #             shards and keystores: the same on every node, so every replica of a shard
  #             finds an entity at the same place.
  #   meta_members  the nodes that run members of this group: the seeds, until one leaves
  #             and hands its member over to another node (Kuma.Cluster.leave/2).
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
  #   projections  name => %{kind, module, opts, owner, epoch, checkpoint}: the projections
  #             and read models of the cluster, each run by its owner only
  #             (Kuma.Cluster.Projections). `epoch` counts owner changes; a checkpoint is
  #             saved only by the owner of the current epoch, so one that lost its place
  #             (cut off, then replaced) cannot move it back.
  @behaviour :ra_machine

  @impl :ra_machine
  def init(_config), do: %{identity: nil, nodes: %{}, shards: %{}, moves: %{}, projections: %{}}

  @impl :ra_machine
  def apply(_meta, {:join, :existing}, %{identity: nil} = state), do: {state, {:error, :not_formed}}

  def apply(_meta, {:join, proposed}, %{identity: nil} = state) do
    {members, identity} = Map.pop(proposed, :shard_members, %{})
    nodes = Map.new(identity.seeds, &{&1, :active})
    state = Map.put(%{state | identity: identity, nodes: nodes, shards: members}, :meta_members, identity.seeds)
    {state, {:ok, identity}}
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

      node in meta_members(state) and replacement(state, node) == nil ->
        {state, {:error, :seed}}

      state.nodes[node] == :active and length(active) - 1 < identity.replicas ->
        {state, {:error, {:too_few_nodes, length(active) - 1, identity.replicas}}}

      true ->
        {%{state | nodes: Map.put(state.nodes, node, :leaving)}, :ok}
    end
  end

  def apply(_meta, {:forget, node}, %{identity: %{}} = state) do
    holding = for {shard, members} <- state.shards, node in members, do: shard
    holding = if node in meta_members(state), do: [:metadata | holding], else: holding

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

  # The members of the metadata group itself, recorded after every change of it (a
  # member handed over to another node when its node leaves: Kuma.Cluster.leave/2).
  def apply(_meta, {:meta_members, members}, %{identity: %{}} = state),
    do: {Map.put(state, :meta_members, members), :ok}

  def apply(_meta, {:members, shard, members}, %{identity: %{}} = state),
    do: {%{state | shards: Map.put(state.shards, shard, members)}, :ok}

  def apply(_meta, {:move, shard, nil}, %{identity: %{}} = state),
    do: {%{state | moves: Map.delete(state.moves, shard)}, :ok}

  def apply(_meta, {:move, shard, move}, %{identity: %{}} = state),
    do: {%{state | moves: Map.put(state.moves, shard, move)}, :ok}

  # A projection declared (Kuma.Projection.start/3, or a store's `projections:` option on
  # any node): `{:ok, :new}`, or `{:ok, :existing}` if one of that name is declared already
  # with the same kind and module (else an error: two projections cannot share a name).
  def apply(_meta, {:declare_projection, name, decl}, %{identity: %{}} = state) do
    projections = Map.get(state, :projections, %{})

    case projections do
      %{^name => %{kind: kind, module: module}} when kind == decl.kind and module == decl.module ->
        {state, {:ok, :existing}}

      %{^name => _other} ->
        {state, {:error, {:already_started, name}}}

      _ ->
        entry = Map.merge(decl, %{owner: nil, epoch: 0, checkpoint: %{}})
        {Map.put(state, :projections, Map.put(projections, name, entry)), {:ok, :new}}
    end
  end

  def apply(_meta, {:undeclare_projection, name}, %{identity: %{}} = state) do
    projections = Map.get(state, :projections, %{})

    if Map.has_key?(projections, name),
      do: {Map.put(state, :projections, Map.delete(projections, name)), :ok},
      else: {state, {:error, {:unknown_projection, name}}}
  end

  # A new owner for a projection (`only_if`: the owner it replaces, so that two nodes
  # claiming at once do not both win): `{:ok, owner, epoch}` as it is afterwards.
  def apply(_meta, {:own_projection, name, node, only_if}, %{identity: %{}} = state) do
    case Map.get(state, :projections, %{}) do
      %{^name => %{owner: ^only_if} = p} ->
        p = %{p | owner: node, epoch: p.epoch + 1}
        {put_in(state, [:projections, name], p), {:ok, node, p.epoch}}

      %{^name => p} ->
        {state, {:ok, p.owner, p.epoch}}

      _ ->
        {state, {:error, {:unknown_projection, name}}}
    end
  end

  def apply(_meta, {:projection_checkpoint, name, epoch, marks}, %{identity: %{}} = state) do
    case Map.get(state, :projections, %{}) do
      %{^name => %{epoch: ^epoch} = p} -> {put_in(state, [:projections, name], %{p | checkpoint: marks}), :ok}
      %{^name => _} -> {state, {:error, :not_owner}}
      _ -> {state, {:error, {:unknown_projection, name}}}
    end
  end

  def apply(_meta, _other, state), do: {state, {:error, :unknown_command}}

  # The nodes that run members of the metadata group: the seeds, until one leaves.
  defp meta_members(state), do: Map.get(state, :meta_members) || state.identity.seeds

  # An active node that could take over a leaving node's member of the metadata group.
  defp replacement(state, leaving) do
    members = meta_members(state)
    Enum.find(Enum.sort(Map.keys(state.nodes)), &(&1 != leaving and &1 not in members and state.nodes[&1] == :active))
  end

  @doc false
  # A query (run on the leader): the whole state (one written before projections and the
  # metadata group's own members were kept here has neither).
  def view(%{identity: identity} = state) do
    state
    |> Map.put_new(:projections, %{})
    |> Map.put(:meta_members, Map.get(state, :meta_members) || (identity && identity.seeds) || [])
  end
end
