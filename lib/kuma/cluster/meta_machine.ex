defmodule Kuma.Cluster.MetaMachine do
  @moduledoc false
  # The Raft state machine of a store's metadata group (one member per seed): the
  # cluster's identity. The first node to propose one sets it; every node then reads the
  # same and checks its own settings against it (Kuma.Cluster.Boot).
  #
  #   identity: %{cluster_id, key, shards, replicas, seeds, encrypted}
  #
  # `key` keys the hashes that stand for entity ids in shards and keystores; it is the same
  # on every node so that every replica of a shard finds an entity at the same place.
  @behaviour :ra_machine

  @impl :ra_machine
  def init(_config), do: %{identity: nil}

  @impl :ra_machine
  def apply(_meta, {:join, proposed}, %{identity: nil} = state),
    do: {%{state | identity: proposed}, {:ok, proposed}}

  def apply(_meta, {:join, _proposed}, %{identity: identity} = state), do: {state, {:ok, identity}}
  def apply(_meta, _other, state), do: {state, {:error, :unknown_command}}
end
