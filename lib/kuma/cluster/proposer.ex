defmodule Kuma.Cluster.Proposer do
  @moduledoc false
  # Cluster mode: the one process that writes a shard, on the node that leads it. Group
  # commit survives replication: the writes that arrive while one Raft entry is being
  # committed are prepared together (one NIF call seals them all, Kuma.Native.cluster_prepare)
  # and proposed as the next entry, so the Raft round trip is paid per batch, not per write.
  #
  # One entry is in flight at a time, so each batch is prepared against a shard that has
  # applied every earlier one: a write's seqs come from the entity's head plus the earlier
  # writes of the same batch. A write refused with a conflict (prepared against a stale
  # head, after a change of leader) is prepared again, at most three times.
  #
  # When it starts (its node just became leader) it first commits a barrier, so that this
  # node has applied everything the previous leader committed before it prepares anything
  # or serves a read; only then does it enter this node as the shard's route.
  use GenServer

  require Logger

  alias Kuma.{Cluster, Native, Store}
  alias Kuma.Cluster.Consensus

  @conflict_rounds 3
  @timeout 30_000

  def child_spec({store, shard}) do
    %{id: {__MODULE__, shard}, start: {__MODULE__, :start_link, [{store, shard}]}, restart: :temporary}
  end

  def start_link({store, shard}), do: GenServer.start_link(__MODULE__, {store, shard}, name: via(store, shard))

  defp via(store, shard), do: Store.via(store, {:proposer, shard})

  @doc """
  Stops the proposer of `shard` (this node no longer leads it); its callers get
  `:not_leader` (and send their writes again, to the new leader). One waiting for its
  entry is killed rather than waited for: its callers' writes keep their command ids.
  """
  def stop(store, shard) do
    case Store.whereis(store, {:proposer, shard}) do
      nil ->
        :ok

      pid ->
        try do
          GenServer.stop(pid, :normal, 1_000)
        catch
          :exit, _ ->
            # Dead for sure before the caller goes on (it removes the route next).
            ref = Process.monitor(pid)
            Process.exit(pid, :kill)

            receive do
              {:DOWN, ^ref, _, _, _} -> :ok
            end
        end

        :ok
    end
  end

  @doc """
  Writes through the shard's log: `requests` are `{:append, command_id, entity_id,
  expected | nil, encoded_events}` or `{:erase, command_id, entity_id}`. One answer each,
  in order: `{:ok, appended | count}` or `{:error, reason}`. `{:error, :not_leader}` for
  all if this node does not lead the shard.
  """
  @spec write(Store.t(), non_neg_integer(), [tuple()], timeout()) :: [{:ok, term()} | {:error, term()}]
  def write(%Store{name: name}, shard, requests, timeout) do
    GenServer.call(via(name, shard), {:write, requests}, timeout)
  catch
    :exit, {:timeout, _} ->
      Enum.map(requests, fn _ -> {:error, {:outcome_unknown, :timeout}} end)

    :exit, {reason, _} when reason in [:noproc, :normal, :shutdown] ->
      Enum.map(requests, fn _ -> {:error, :not_leader} end)

    :exit, {{:shutdown, _}, _} ->
      Enum.map(requests, fn _ -> {:error, :not_leader} end)

    :exit, reason ->
      Enum.map(requests, fn _ -> {:error, {:outcome_unknown, reason}} end)
  end

  @doc "Has the proposer commit an empty entry (so that Raft replicates to every member)."
  def nudge(store, shard) do
    case Store.whereis(store, {:proposer, shard}) do
      nil -> :ok
      pid -> send(pid, :nudge)
    end

    :ok
  end

  @impl true
  def init({store, shard}) do
    {:ok, s} = Store.lookup(store)
    group = Cluster.shard_group(s.cluster, shard)
    {:ok, %{store: store, shard: shard, group: group, ready: false, queue: [], flush: false}, {:continue, :barrier}}
  end

  @impl true
  def handle_continue(:barrier, st) do
    # An empty entry: once this node applied it, it applied everything before it.
    case submit(st, []) do
      {:ok, [], term} ->
        # Only now does this node serve the shard's calls (Kuma.Cluster.Shards): its copy
        # holds everything committed before this term. Reads confirm the term before they
        # are served (Kuma.Cluster.Route).
        {:ok, s} = Store.lookup(st.store)
        Kuma.Cluster.Route.enter_self(s, st.shard, term)
        {:noreply, schedule(%{st | ready: true})}

      other ->
        # Not (or no longer) the leader: whoever is will have its own proposer.
        {:stop, {:shutdown, {:barrier_failed, other}}, st}
    end
  end

  @impl true
  def handle_call({:write, requests}, from, st) do
    {:noreply, schedule(%{st | queue: [{from, requests} | st.queue]})}
  end

  @impl true
  def handle_info(:flush, %{queue: []} = st), do: {:noreply, %{st | flush: false}}

  def handle_info(:flush, st) do
    callers = Enum.reverse(st.queue)
    requests = Enum.flat_map(callers, fn {_from, reqs} -> reqs end)
    answers = commit(st, requests, @conflict_rounds)
    reply_each(callers, answers)
    {:noreply, %{st | queue: [], flush: false}}
  end

  def handle_info(:nudge, %{ready: true} = st) do
    _ = propose(st, [])
    {:noreply, st}
  end

  def handle_info(_other, st), do: {:noreply, st}

  @impl true
  def terminate(_reason, st) do
    for {from, reqs} <- st.queue, do: GenServer.reply(from, Enum.map(reqs, fn _ -> {:error, :not_leader} end))
    :ok
  end

  # A flush is due once ready and something is queued; the message lands behind every call
  # already in the mailbox, so they all make the next batch.
  defp schedule(%{ready: true, flush: false, queue: [_ | _]} = st) do
    send(self(), :flush)
    %{st | flush: true}
  end

  defp schedule(st), do: st

  defp reply_each([], _answers), do: :ok

  defp reply_each([{from, reqs} | rest], answers) do
    {mine, others} = Enum.split(answers, length(reqs))
    GenServer.reply(from, mine)
    reply_each(rest, others)
  end

  # Prepares and proposes `requests` as one log entry; one answer each, in order.
  defp commit(st, requests, rounds) do
    {:ok, s} = Store.lookup(st.store)
    appends = for {:append, cid, id, expected, events} <- requests, do: {cid, id, expected, events}

    prepared =
      case appends do
        [] -> []
        _ -> prepare(s, appends)
      end

    {commands, slots} = commands(requests, prepared)

    outcomes =
      case commands do
        [] -> []
        _ -> propose(st, commands)
      end

    answers = answers(slots, outcomes)
    conflicted = for {{:conflict, _}, i} <- Enum.with_index(answers), do: i

    if conflicted != [] and rounds > 0 and is_list(outcomes) do
      again = commit(st, Enum.map(conflicted, &Enum.at(requests, &1)), rounds - 1)
      retried = Map.new(Enum.zip(conflicted, again))
      answers |> Enum.with_index() |> Enum.map(fn {a, i} -> Map.get(retried, i, a) end)
    else
      Enum.map(answers, fn
        {:conflict, head} -> {:error, {:outcome_unknown, {:conflict, head}}}
        other -> other
      end)
    end
  end

  # One {:ok, prepared} | {:error, reason} per append (all failed if the call did).
  defp prepare(s, appends) do
    {count, bytes} = size(for {_cid, _id, _expected, events} <- appends, event <- events, do: event)

    prepare =
      if Kuma.EventLog.dirty?(count, bytes), do: &Native.cluster_prepare_dirty/2, else: &Native.cluster_prepare/2

    case prepare.(s.native, appends) do
      {:ok, prepared} -> prepared
      {:error, _} = error -> Enum.map(appends, fn _ -> error end)
    end
  end

  @doc false
  # Events and payload bytes of encoded events ({type, metadata, payload, scope}).
  def size(events),
    do: Enum.reduce(events, {0, 0}, fn {_, m, p, _}, {n, b} -> {n + 1, b + byte_size(m) + byte_size(p)} end)

  # The log entry's commands, and for each request either the index of its command or
  # its answer already (a preparation that failed).
  defp commands(requests, prepared), do: commands(requests, prepared, [], [], 0)

  defp commands([], _prepared, commands, slots, _n), do: {Enum.reverse(commands), Enum.reverse(slots)}

  defp commands([{:append, _, _, _, _} | rest], [{:ok, p} | prepared], commands, slots, n),
    do: commands(rest, prepared, [p | commands], [{:command, n} | slots], n + 1)

  defp commands([{:append, _, _, _, _} | rest], [{:error, _} = e | prepared], commands, slots, n),
    do: commands(rest, prepared, commands, [{:done, e} | slots], n)

  defp commands([{:erase, cid, id} | rest], prepared, commands, slots, n) do
    erase = {:kuma_erase, cid, id, System.os_time(:microsecond)}
    commands(rest, prepared, [erase | commands], [{:command, n} | slots], n + 1)
  end

  # Commits the commands as one log entry and waits until this node's writer applied it
  # (it tells us, see Kuma.Cluster.ShardMachine): one outcome each, or {:unknown, why}.
  defp propose(st, commands) do
    case submit(st, commands) do
      {:ok, outcomes, _term} -> outcomes
      unknown -> unknown
    end
  end

  # `propose/2`, with the term of the entry: {:ok, outcomes, term} or {:unknown, why}.
  defp submit(st, commands) do
    ref = make_ref()

    case Consensus.engine().command(st.group, node(), {:batch, commands, {self(), ref}}, @timeout) do
      {:ok, {:queued, term}, leader} when leader == node() ->
        receive do
          {:kuma_applied, ^ref, {:ok, outcomes}} -> {:ok, outcomes, term}
          {:kuma_applied, ^ref, {:error, reason}} -> {:unknown, reason}
        after
          @timeout -> {:unknown, :timeout}
        end

      {:ok, other, leader} ->
        {:unknown, {:applied_elsewhere, leader, other}}

      {:timeout, _} ->
        {:unknown, :timeout}

      {:error, reason} ->
        {:unknown, reason}
    end
  end

  defp answers(slots, {:unknown, why}) do
    Enum.map(slots, fn
      {:done, answer} -> answer
      {:command, _} -> {:error, {:outcome_unknown, why}}
    end)
  end

  defp answers(slots, outcomes) do
    outcomes = List.to_tuple(outcomes)

    Enum.map(slots, fn
      {:done, answer} ->
        answer

      {:command, n} ->
        case elem(outcomes, n) do
          {:appended, appended} -> {:ok, appended}
          {:erased, count} -> {:ok, count}
          {:refused, reason} -> {:error, reason}
          {:conflict, head} -> {:conflict, head}
        end
    end)
  end
end
