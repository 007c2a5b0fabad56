defmodule Kuma.Cluster.ShardMachine do
  @moduledoc false
  # The Raft state machine of one shard. Its real state is the shard's file on each member:
  # applying a log entry hands its prepared commands to this node's shard writer, which
  # writes them in one transaction together with the entry's index (kuma_core's replica
  # module), so a replay after a restart writes nothing twice. The reply (on the leader, to
  # the proposer) is one outcome per command.
  #
  # Apply waits for the writer's commit: a member's state is on its disk before it moves on.
  # A member that cannot write (its store closed, its disk full) stops here (exits), and ra
  # restarts it to apply the same entry again; the other members go on.
  #
  # Becoming leader or ceasing to be one is told to Kuma.Cluster.Shards, which starts or
  # stops the shard's proposer and entity processes on this node.
  @behaviour :ra_machine

  alias Kuma.{Native, Store}

  @impl :ra_machine
  def init(%{store: store, shard: shard}), do: %{store: store, shard: shard}

  @impl :ra_machine
  def apply(%{index: index}, {:batch, commands}, state), do: {state, write(state, index, commands)}
  def apply(_meta, {:barrier, tag}, state), do: {state, {:barrier, tag}}
  def apply(_meta, _other, state), do: {state, {:error, :unknown_command}}

  @impl :ra_machine
  def state_enter(role, %{store: store, shard: shard}),
    do: [{:mod_call, Kuma.Cluster.Shards, :role_changed, [store, shard, role]}]

  defp write(%{store: name, shard: shard}, index, commands) do
    with {:ok, s} <- Store.lookup(name),
         ref = make_ref(),
         {:ok, :ok} <- Native.cluster_apply(s.native, ref, shard, index, commands) do
      receive do
        {:kuma_reply, ^ref, {:ok, outcomes}} -> {:ok, outcomes}
        {:kuma_reply, ^ref, {:error, reason}} -> exit({:kuma_apply_failed, shard, index, reason})
      end
    else
      {:error, reason} -> exit({:kuma_apply_failed, shard, index, reason})
    end
  end
end
