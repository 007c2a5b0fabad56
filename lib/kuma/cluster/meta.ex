defmodule Kuma.Cluster.Meta do
  @moduledoc false
  # Calls to a store's metadata group (Kuma.Cluster.MetaMachine) from any node: through
  # this node's own member if it runs one, else through the group's members in turn (most
  # nodes run none: only the seeds, and nodes a leaving seed handed its member to).

  alias Kuma.Cluster
  alias Kuma.Cluster.{Consensus, MetaMachine}

  @doc "Commits `command` in the metadata group: what the machine answered."
  @spec command(Cluster.t(), term(), timeout()) :: term()
  def command(%Cluster{} = c, command, timeout \\ 5_000) do
    result =
      first(c, fn via ->
        case Consensus.engine().command(Cluster.meta_group(c), via, command, timeout) do
          {:ok, reply, _leader} -> {:ok, reply}
          other -> other
        end
      end)

    with {:ok, reply} <- result, do: reply
  end

  @doc "The metadata group's state, read on its leader."
  @spec view(Cluster.t(), timeout()) :: {:ok, map()} | {:error, term()}
  def view(%Cluster{} = c, timeout \\ 5_000) do
    first(c, &Consensus.engine().query(Cluster.meta_group(c), &1, {MetaMachine, :view, []}, timeout))
  end

  # The first answer from the group's members: this node's own if it runs one, then the
  # members it last heard of (Kuma.Cluster.Shards), then the seeds.
  defp first(c, fun) do
    local = if Process.whereis(Cluster.meta_group(c)), do: [node()], else: []
    vias = Enum.uniq(local ++ Cluster.meta_members(c) ++ c.seeds)

    Enum.reduce_while(vias, {:error, :no_seed_reachable}, fn via, _last ->
      case fun.(via) do
        {:ok, reply} -> {:halt, {:ok, reply}}
        other -> {:cont, other}
      end
    end)
  end
end
