defmodule Kuma.Cluster.ReadGate do
  @moduledoc false
  # Cluster mode: a read is served on a shard's leader only once the leader has confirmed
  # that it still leads. A leader cut off by a partition believes it leads until it hears of
  # a newer term, and would answer from a copy (or an entity process) that lacks what the
  # new leader acknowledged meanwhile. The confirmation asks the group's members for their
  # current term (`Kuma.Cluster.Consensus` `confirm_leader`): one round trip to the others.
  #
  # Reads that arrive together share one confirmation: per shard one round is in flight,
  # and a read that arrives while it is waits for the next one (a round confirms only the
  # reads that arrived before it began). Under load a round serves every read that came in
  # during the previous one, so the cost per read falls as reads rise.
  use GenServer

  alias Kuma.{Cluster, Store}
  alias Kuma.Cluster.Consensus

  # How long a round waits for the members' answers before it counts as not confirmed
  # (the reads then get `:not_leader` and are tried again, within their own timeout).
  @round_timeout 2_000

  def child_spec(store), do: %{id: __MODULE__, start: {__MODULE__, :start_link, [store]}}

  def start_link(store), do: GenServer.start_link(__MODULE__, store, name: Store.via(store, :read_gate))

  @doc """
  Whether this node, which holds `shard`'s route, still leads it: confirmed by a round
  that began after this call. False if not confirmed within `timeout`.
  """
  @spec confirm(Store.t(), non_neg_integer(), timeout()) :: boolean()
  def confirm(%Store{name: name}, shard, timeout) do
    GenServer.call(Store.via(name, :read_gate), {:confirm, shard}, timeout)
  catch
    :exit, _ -> false
  end

  @impl true
  def init(store) do
    # Every read on this node passes here, and each costs the gate a few µs: at normal
    # priority the gate would wait its turn behind the readers it serves.
    Process.flag(:priority, :high)
    {:ok, s} = Store.lookup(store)
    # rounds: shard => {monitor ref, callers it answers}; next: shard => callers waiting.
    {:ok, %{cluster: s.cluster, rounds: %{}, next: %{}}}
  end

  @impl true
  def handle_call({:confirm, shard}, from, st) do
    if Map.has_key?(st.rounds, shard) do
      {:noreply, %{st | next: Map.update(st.next, shard, [from], &[from | &1])}}
    else
      {:noreply, start_round(st, shard, [from])}
    end
  end

  @impl true
  def handle_info({:DOWN, ref, :process, _pid, result}, st) do
    case Enum.find(st.rounds, fn {_shard, {r, _}} -> r == ref end) do
      {shard, {_, callers}} ->
        for from <- callers, do: GenServer.reply(from, result == :confirmed)
        {waiting, next} = Map.pop(st.next, shard, [])
        st = %{st | rounds: Map.delete(st.rounds, shard), next: next}
        {:noreply, if(waiting == [], do: st, else: start_round(st, shard, waiting))}

      nil ->
        {:noreply, st}
    end
  end

  def handle_info(_other, st), do: {:noreply, st}

  # A round for `shard`, by the term this node entered its route in (its proposer's
  # barrier is in that term, so its copy holds everything committed before it).
  defp start_round(st, shard, callers) do
    case :ets.lookup(st.cluster.routes, {:term, shard}) do
      [{_, term}] ->
        group = Cluster.shard_group(st.cluster, shard)

        {_pid, ref} =
          spawn_monitor(fn ->
            exit(
              if Consensus.engine().confirm_leader(group, term, @round_timeout) == :ok, do: :confirmed, else: :refused
            )
          end)

        %{st | rounds: Map.put(st.rounds, shard, {ref, callers})}

      [] ->
        for from <- callers, do: GenServer.reply(from, false)
        st
    end
  end
end
