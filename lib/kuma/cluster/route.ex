defmodule Kuma.Cluster.Route do
  @moduledoc false
  # Cluster mode: where a call about an entity or a shard runs. Everything about a shard
  # runs on its leader: the entity processes live there, writes are prepared there, and
  # reads there see every acknowledged write. A call made on another node is sent to the
  # leader (`:erpc`) and runs there as if made there; a leader that changed meanwhile
  # answers `:not_leader` (or is gone), and the call is sent again, to the new leader, until
  # the caller's timeout. Writes carry their command id through these retries, so a write
  # that did happen is answered, not done twice (Kuma.Cluster.Proposer).
  #
  # Leaders are cached per store (an ETS table the store owner holds): a shard this node
  # leads is entered by its proposer once caught up (Kuma.Cluster.Proposer); others are
  # asked of Raft and cached until a call finds them wrong.
  #
  # A read is served by a leader only once it has confirmed that it still leads
  # (Kuma.Cluster.ReadGate). Writes need no such check: a deposed leader cannot commit them.

  alias Kuma.{Cluster, Native, Store}
  alias Kuma.Cluster.{Consensus, ReadGate, Shards}

  # Set in the process that runs a call sent from another node: it must run here or say
  # :not_leader, never be sent on (no call goes round in circles).
  @routed :kuma_routed

  @doc """
  Runs `local` for a call about `shard`: here if this node leads it (or the store is not a
  cluster), else `{module, fun, args}` on the leader. Retries on `:not_leader` and on a
  lost leader until `timeout` (ms) is used up; the last failure is returned.
  """
  @spec run(Store.t(), non_neg_integer(), {module(), atom(), list()}, timeout(), (() -> term()), keyword()) :: term()
  def run(s, shard, mfa, timeout, local, opts \\ [])
  def run(%Store{cluster: nil}, _shard, _mfa, _timeout, local, _opts), do: local.()

  def run(%Store{} = s, shard, mfa, timeout, local, opts) do
    write? = Keyword.get(opts, :write, false)
    here = fn -> if serves?(s, shard, write?, timeout), do: local.(), else: {:error, :not_leader} end

    if Process.get(@routed) do
      here.()
    else
      # A write carries its command id through every attempt: one whose outcome is unknown
      # (its leader died or was deposed before answering) is sent again, and answered the
      # first outcome if it had been committed.
      retry = if write?, do: &retry_write?/1, else: &retry?/1
      attempt(s, shard, mfa, here, deadline(timeout), 0, {:error, :not_leader}, retry)
    end
  end

  @doc """
  Enters this node as `shard`'s route, leading it in Raft term `term` (the term of its
  proposer's first entry, which this node's copy has applied).
  """
  @spec enter_self(Store.t(), non_neg_integer(), non_neg_integer()) :: true
  def enter_self(%Store{cluster: c}, shard, term),
    do: :ets.insert(c.routes, [{shard, node()}, {{:term, shard}, term}])

  @doc "Removes this node as `shard`'s route (it no longer leads it)."
  @spec leave_self(Store.t(), non_neg_integer()) :: true
  def leave_self(%Store{cluster: c}, shard) do
    :ets.match_delete(c.routes, {shard, node()})
    :ets.delete(c.routes, {:term, shard})
  end

  # Whether this node serves a call about `shard` now: it leads it, and for a read, it has
  # confirmed that it still does.
  defp serves?(s, shard, write?, timeout) do
    Shards.leader?(s, shard) and (write? or ReadGate.confirm(s, shard, timeout))
  end

  @doc """
  Cluster mode: `opts` with a command id for a write (kept if one is there already, as
  in a retry), so that every attempt of the write is the same command. Single node:
  `opts` as they are.
  """
  @spec command_id(Store.t(), keyword()) :: keyword()
  def command_id(%Store{cluster: nil}, opts), do: opts
  def command_id(_s, opts), do: Keyword.put_new_lazy(opts, :kuma_command_id, &new_command_id/0)

  @doc """
  A new command id: the time (µs) then 8 random bytes. Time first keeps the replicas' table
  of applied commands growing at its end (a random key would dirty a random page of it
  at every write, see kuma_core's replica module); the random half keeps ids unique.
  """
  @spec new_command_id() :: <<_::128>>
  def new_command_id, do: <<System.os_time(:microsecond)::64, :crypto.strong_rand_bytes(8)::binary>>

  @doc "The shard of an entity id."
  @spec shard(Store.t(), binary()) :: non_neg_integer()
  def shard(%Store{native: native}, entity_id), do: Native.store_shard_for(native, entity_id)

  @doc false
  # What runs on the leader for a call sent by another node.
  def routed(module, fun, args) do
    Process.put(@routed, true)
    apply(module, fun, args)
  end

  defp deadline(:infinity), do: :infinity
  defp deadline(ms), do: System.monotonic_time(:millisecond) + ms

  defp left(:infinity), do: :infinity
  defp left(deadline), do: max(deadline - System.monotonic_time(:millisecond), 0)

  defp attempt(s, shard, {m, f, a} = mfa, local, deadline, n, last, retry?) do
    if n > 0 and left(deadline) == 0 do
      last
    else
      result =
        case leader(s, shard) do
          {:ok, node} when node == node() ->
            local.()

          {:ok, node} ->
            remote(node, m, f, a, left(deadline))

          {:error, reason} ->
            {:error, {:no_leader, reason}}
        end

      if retry?.(result) do
        forget(s, shard)
        Process.sleep(min(20 * (n + 1), 200))
        attempt(s, shard, mfa, local, deadline, n + 1, result, retry?)
      else
        result
      end
    end
  end

  defp remote(node, m, f, a, timeout) do
    :erpc.call(node, __MODULE__, :routed, [m, f, a], timeout)
  catch
    :error, {:erpc, :timeout} -> {:error, :timeout}
    :error, {:erpc, reason} -> {:error, {:unreachable, node, reason}}
    :exit, {reason, _} -> {:error, {:unreachable, node, reason}}
    kind, reason -> {:error, {:unreachable, node, {kind, reason}}}
  end

  defp retry?({:error, :not_leader}), do: true
  defp retry?({:error, {:no_leader, _}}), do: true
  defp retry?({:error, {:unreachable, _, _}}), do: true
  defp retry?({:error, {:no_store, _}}), do: true
  defp retry?(_), do: false

  defp retry_write?({:error, {:outcome_unknown, _}}), do: true
  defp retry_write?(other), do: retry?(other)

  @doc "The node that leads `shard`, from the cache or from Raft."
  @spec leader(Store.t(), non_neg_integer()) :: {:ok, node()} | {:error, term()}
  def leader(%Store{cluster: c}, shard) do
    case :ets.lookup(c.routes, shard) do
      [{^shard, node}] ->
        {:ok, node}

      [] ->
        case Cluster.members(c, shard) do
          [] ->
            {:error, :members_unknown}

          members ->
            via = if node() in members, do: node(), else: Enum.random(members)

            case Consensus.engine().leader(Cluster.shard_group(c, shard), via, 2_000) do
              {:ok, node} ->
                # This node's own leadership is entered only by its proposer, once caught up.
                if node != node(), do: :ets.insert(c.routes, {shard, node})
                {:ok, node}

              error ->
                error
            end
        end
    end
  end

  defp forget(%Store{cluster: c}, shard) do
    case :ets.lookup(c.routes, shard) do
      [{^shard, node}] when node != node() -> :ets.delete(c.routes, shard)
      _ -> :ok
    end
  end
end
