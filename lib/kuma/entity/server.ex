defmodule Kuma.Entity.Server do
  @moduledoc false
  # The process of one live entity: the only writer of its stream.
  #
  # Invariants
  # - `state` is the fold of every committed event up to `seq`; it changes only after the
  #   storage acknowledged the append that produced it (decide -> evolve -> persist ->
  #   publish). A raise in handle/apply happens before anything is written.
  # - The row {id, pid, aggregate, state, seq, epoch} in the store's entity table always
  #   holds the state of the last commit, so readers need not call this process.
  # - Any doubt about our view of the stream (a concurrent store-level write, user code
  #   that raised) ends in a reload from storage: either in place or by stopping, so the
  #   next call starts from disk.

  use GenServer, restart: :temporary

  alias Kuma.{Aggregate, Codec, EventLog, Native, Store}
  alias Kuma.Entity.Loader
  require Native

  require Logger

  defstruct [:store_name, :aggregate, :id, :state, :hash, :failed, seq: 0, snapshot_seq: 0, replayed: 0]

  # Hibernate (full GC, smallest heap) after this long without messages.
  @hibernate_after 2_000
  # Reloads and decides again after a conflicting write that did not come through us.
  @retries 3
  # Writes decided together and appended in one go when they wait in our mailbox (see
  # "pipelining" below).
  @pipeline 64
  # A failed load is kept this long so the callers already on their way (the one that
  # started us first) get its reason instead of a process that is gone.
  @failed_linger 100

  def start_link({store_name, aggregate, id}) do
    GenServer.start_link(__MODULE__, {store_name, aggregate, id},
      name: via(store_name, id),
      hibernate_after: @hibernate_after
    )
  end

  def via(store_name, id), do: {:via, Registry, {Kuma.Registry, {store_name, :entity, id}}}

  @impl true
  def init({store_name, aggregate, id}) do
    # Loading reads the disk: do it after init returns, so the supervisor partition that
    # started us is not blocked; calls queue meanwhile.
    {:ok, %__MODULE__{store_name: store_name, aggregate: aggregate, id: id}, {:continue, :load}}
  end

  @impl true
  def handle_continue(:load, st) do
    with {:ok, s} <- Store.lookup(st.store_name),
         {:ok, loaded} <- Loader.load(s, st.aggregate, st.id) do
      st = %{st | state: loaded.state, seq: loaded.seq, hash: loaded.hash}
      st = %{st | snapshot_seq: loaded.snapshot_seq, replayed: loaded.replayed}
      publish(s, st)
      {:noreply, st}
    else
      {:error, reason} -> {:noreply, %{st | failed: reason}, @failed_linger}
    end
  end

  @impl true
  def handle_call(:info, _from, %{failed: reason} = st) when reason != nil,
    do: {:reply, {:ok, %{live: false}}, st, @failed_linger}

  def handle_call(_request, _from, %{failed: reason} = st) when reason != nil,
    do: {:stop, {:shutdown, {:load_failed, reason}}, {:error, reason}, st}

  def handle_call({:read, aggregate}, _from, st) do
    with :ok <- same_aggregate(st, aggregate), do: {:reply, {:ok, st.state}, st}, else: (e -> {:reply, e, st})
  end

  # Writes: {:execute, aggregate, command, opts} and, from Kuma.append with an entity handle
  # (aggregate given) or from the store-level Kuma.append/4 routed here because the entity
  # is live (aggregate :any), {:append, aggregate, events, opts}.
  def handle_call({op, _, _, _} = request, from, st) when op in [:execute, :append] do
    t0 = Kuma.Telemetry.listening?() && System.monotonic_time()

    {writes, result} =
      case waiting_writes(st, @pipeline - 1) do
        [] -> {1, write_one(request, st)}
        more -> {1 + length(more), write_pipelined([{from, request} | more], st)}
      end

    if t0, do: emit_write(st, result, writes, System.monotonic_time() - t0)
    result
  end

  # Whether a command with this id was applied after `since` (Kuma.Entity.applied?/3):
  # answered after every write queued before the question.
  def handle_call({:applied, command_id, since}, _from, st),
    do: {:reply, applied(st, command_id: command_id, since_seq: since), st}

  def handle_call(:info, _from, st) do
    info = %{
      live: true,
      pid: self(),
      aggregate: st.aggregate,
      seq: st.seq,
      snapshot_seq: st.snapshot_seq,
      replayed_on_load: st.replayed
    }

    {:reply, {:ok, info}, st}
  end

  # {:passivate, threshold}: stop unless a read touched us at or after `threshold` (the
  # reaper's view may be a tick old). :infinity forces it.
  @impl true
  def handle_info(:timeout, %{failed: reason} = st) when reason != nil,
    do: {:stop, {:shutdown, {:load_failed, reason}}, st}

  def handle_info(_other, %{failed: reason} = st) when reason != nil, do: {:noreply, st, @failed_linger}

  def handle_info({:passivate, threshold}, st) do
    with {:ok, s} <- Store.lookup(st.store_name),
         [{_, pid, _, _, _, epoch}] when pid == self() <- :ets.lookup(s.entities, st.id),
         true <- threshold == :infinity or epoch < threshold do
      Kuma.Telemetry.execute([:kuma, :entity, :passivate], %{}, %{store: st.store_name, aggregate: st.aggregate})
      {:stop, {:shutdown, :passivated}, st}
    else
      _ -> {:noreply, st}
    end
  end

  # Answers to our fire-and-forget snapshot writes.
  def handle_info({:kuma_reply, _ref, {:ok, :ok}}, st), do: {:noreply, st}

  def handle_info({:kuma_reply, _ref, {:error, reason}}, st) do
    Logger.warning("Kuma: a snapshot (#{inspect(st.aggregate)}, seq #{st.seq}) failed: #{Kuma.Error.format(reason)}")
    {:noreply, st}
  end

  def handle_info(_other, st), do: {:noreply, st}

  @impl true
  def terminate(_reason, st) do
    case Store.lookup(st.store_name) do
      {:ok, s} -> :ets.match_delete(s.entities, {st.id, self(), :_, :_, :_, :_})
      _ -> :ok
    end
  end

  # -- the write path ----------------------------------------------------------------------

  # [:kuma, :execute, :stop] (Kuma.Telemetry): the writes handled in one go and the events
  # they committed.
  defp emit_write(before, result, writes, duration) do
    # Every reply tuple ends with our state.
    %__MODULE__{seq: seq} = elem(result, tuple_size(result) - 1)
    events = max(seq - before.seq, 0)

    Kuma.Telemetry.execute(
      [:kuma, :execute, :stop],
      %{duration: duration, events: events, writes: writes},
      %{store: before.store_name, aggregate: before.aggregate, entity_id: before.id}
    )
  end

  defp write_one({op, _, _, opts} = request, st) do
    case accept(request, st) do
      {:ok, decide} -> write(st, decide, opts, retries(op, opts))
      error -> {:reply, error, st}
    end
  end

  # The checks a write must pass against `st` (our state, or in a batch the state the
  # writes before it left), and its decide function.
  defp accept({:execute, aggregate, command, opts}, st) do
    with :ok <- same_aggregate(st, aggregate),
         :ok <- handles_commands(st),
         :ok <- expected(st, opts),
         {:ok, false} <- applied(st, opts) do
      {:ok, fn state -> decide(st.aggregate, state, command) end}
    else
      # Already applied (its events carry its command id): run again, it writes nothing.
      {:ok, true} -> {:ok, fn _state -> {:ok, []} end}
      error -> error
    end
  end

  defp accept({:append, aggregate, events, opts}, st) do
    with :ok <- same_aggregate(st, aggregate), :ok <- expected(st, opts), do: {:ok, fn _state -> {:ok, events} end}
  end

  # An idempotent command (`:command_id`): {:ok, true} if one of our events after
  # `:since_seq` carries its id. Read from storage, and only the events after `since_seq`
  # (none when nothing was written since: the caller's usual case).
  defp applied(st, opts) do
    case {Keyword.get(opts, :command_id), Keyword.get(opts, :since_seq, 0)} do
      {nil, _} ->
        {:ok, false}

      {_id, since} when since >= st.seq ->
        {:ok, false}

      {id, since} ->
        with {:ok, s} <- Store.lookup(st.store_name),
             {:ok, events} <- EventLog.events(s, st.id, from: since + 1) do
          {:ok, Enum.any?(events, &(is_map(&1.metadata) and Map.get(&1.metadata, :command_id) == id))}
        end
    end
  end

  # Without :expected_seq an append asked for no version check: a write that slipped in
  # beside us (a store-level append while we were starting) is no reason to fail.
  defp retries(:execute, _opts), do: @retries
  defp retries(:append, opts), do: if(Keyword.get(opts, :expected_seq) == nil, do: @retries, else: 0)

  # -- pipelining ----------------------------------------------------------------------------
  #
  # Writes already waiting in our mailbox when one is handled are taken with it (up to
  # @pipeline in all): each is decided on the state the ones before it left, as if they had
  # run one after another, and all their events go down in one append, so they share one
  # round trip to the shard's writer and one group commit. Each caller then gets its own
  # answer (its own last seq). Without other writers waiting nothing changes: one write,
  # one append. Single node only: in cluster mode every write carries its own command id
  # for deduplication.
  #
  # Safety: nothing is written before every decision is made, and the append is atomic.
  # Anything unusual (user code that raised, an append refused as invalid or too large, or
  # a conflicting write beside us) falls back to one write at a time, from our unchanged
  # state: those are errors after which storage is known to hold nothing of the batch. Any
  # other error goes to every caller of the batch, as it would to a single caller; one that
  # leaves what storage holds unknown (no answer from the writer within commit_wait) also
  # stops us, so the next use reloads. We wait for the writer's answer however soon our
  # callers give up (commit_wait/2). The new state is published before anyone is
  # answered, as for one write.

  defp waiting_writes(st, room) do
    case Store.lookup(st.store_name) do
      {:ok, %Store{cluster: nil}} -> take_waiting(room, [])
      _ -> []
    end
  end

  defp take_waiting(0, acc), do: Enum.reverse(acc)

  defp take_waiting(room, acc) do
    receive do
      {:"$gen_call", from, {op, _, _, _} = request} when op in [:execute, :append] ->
        take_waiting(room - 1, [{from, request} | acc])
    after
      0 -> Enum.reverse(acc)
    end
  end

  defp write_pipelined(batch, st) do
    with {:ok, s} <- Store.lookup(st.store_name),
         {:ok, planned} <- plan(batch, st, s) do
      commit_planned(planned, batch, s, st)
    else
      _ -> write_each(batch, st)
    end
  end

  # Decides every write of the batch in order: {:ok, plan} with one answer per write
  # ({:error, from, reason}, or {:ok, from, opts, seq} to send once its events are
  # committed), or :fallback if user code raised (nobody answered yet).
  defp plan(batch, st, s) do
    init = %{state: st.state, seq: st.seq, encoded: [], bytes: 0, answers: [], ids: MapSet.new()}

    Enum.reduce_while(batch, {:ok, init}, fn {from, request}, {:ok, acc} ->
      opts = elem(request, 3)

      case plan_one(request, acc, st, s) do
        {:ok, encoded, new_state} ->
          seq = acc.seq + length(encoded.encoded)
          id = Keyword.get(opts, :command_id)

          {:cont,
           {:ok,
            %{
              acc
              | state: new_state,
                seq: seq,
                encoded: [encoded.encoded | acc.encoded],
                bytes: acc.bytes + encoded.bytes,
                answers: [{:ok, from, opts, seq} | acc.answers],
                ids: if(id, do: MapSet.put(acc.ids, id), else: acc.ids)
            }}}

        {:error, {:user_code_crashed, _, _}} ->
          {:halt, :fallback}

        {:error, reason} ->
          {:cont, {:ok, %{acc | answers: [{:error, from, reason} | acc.answers]}}}
      end
    end)
  end

  defp plan_one({_, _, _, opts} = request, acc, st, s) do
    if MapSet.member?(acc.ids, Keyword.get(opts, :command_id)) do
      # The same idempotent command twice in one batch (a retry queued behind the first).
      {:ok, %{events: [], encoded: [], bytes: 0}, acc.state}
    else
      seen = %{st | state: acc.state, seq: acc.seq}
      with {:ok, decide} <- accept(request, seen), do: decide_and_fold(seen, decide, opts, s)
    end
  end

  defp commit_planned(planned, batch, s, st) do
    answers = Enum.reverse(planned.answers)

    case List.flatten(Enum.reverse(planned.encoded)) do
      [] ->
        Enum.each(answers, &send_answer(&1, fn opts, _seq -> empty_answer(st.seq, opts) end))
        {:noreply, st}

      encoded ->
        case EventLog.append_encoded(s, st.id, st.seq, %{encoded: encoded, bytes: planned.bytes}, commit_wait(s, [])) do
          {:ok, Native.appended(first_seq: first, last_seq: last, hash: hash) = appended} when first == st.seq + 1 ->
            before = st.seq
            st = %{st | state: planned.state, seq: last, hash: hash}
            # Published before anyone is answered: a caller that reads right after its
            # answer sees its write.
            publish(s, st)
            Enum.each(answers, &send_answer(&1, fn opts, seq -> answer_at(appended, seq, before, opts) end))
            maybe_snapshot(s, st, before)
            {:noreply, st}

          {:error, reason} when elem(reason, 0) in [:invalid, :too_large, :wrong_expected_seq] ->
            # Refused before anything was written (one write's event, the batch's size, or
            # a write beside us): as if each write had come alone.
            write_each(batch, st)

          {:error, :timeout} ->
            # No answer from the writer even after commit_wait: what storage holds is
            # unknown; start over from it next time.
            Enum.each(answers, &send_answer(&1, fn _opts, _seq -> {:error, :timeout} end))
            {:stop, {:shutdown, :stale}, st}

          {:error, reason} ->
            Enum.each(answers, &send_answer(&1, fn _opts, _seq -> {:error, reason} end))
            {:noreply, st}
        end
    end
  end

  defp send_answer({:error, from, reason}, _ok), do: GenServer.reply(from, {:error, reason})
  defp send_answer({:ok, from, opts, seq}, ok), do: GenServer.reply(from, ok.(opts, seq))

  # The answer of a write of the batch whose events ended at `seq`, as if it had been
  # appended alone. A write with no events answers the seq it saw: with an empty token if
  # it came first, else with the position of the event before it (committed now).
  defp answer_at(_appended, before, before, opts), do: empty_answer(before, opts)

  defp answer_at(Native.appended(first_seq: first, first_pos: first_pos) = appended, seq, _before, opts) do
    EventLog.answer(Native.appended(appended, last_seq: seq, last_pos: first_pos + (seq - first)), opts)
  end

  defp empty_answer(seq, opts), do: if(Keyword.get(opts, :return) == :token, do: {:ok, seq, %{}}, else: {:ok, seq})

  # One write at a time, as if each had arrived alone; a write that stops us (user code
  # that raised, a stale view) stops us after its answer, and the callers still waiting
  # try again on a fresh process (Kuma.Entity's call).
  defp write_each([], st), do: {:noreply, st}

  defp write_each([{from, request} | rest], st) do
    case write_one(request, st) do
      {:reply, reply, st} ->
        GenServer.reply(from, reply)
        write_each(rest, st)

      {:stop, reason, reply, st} ->
        GenServer.reply(from, reply)
        {:stop, reason, st}
    end
  end

  # decide -> evolve -> persist -> publish. `decide` returns {:ok, events} | {:error, reason}.
  # Each event is encoded once, here (sensitive values sealed under their subjects' keys,
  # their clear values kept for the state), and the bytes go down to storage as they are.
  defp write(st, decide, opts, retries) do
    with {:ok, s} <- Store.lookup(st.store_name),
         {:ok, encoded, new_state} <- decide_and_fold(st, decide, opts, s) do
      persist(s, st, encoded, new_state, decide, opts, retries)
    else
      {:error, {:user_code_crashed, _, _} = reason} ->
        # Our state is untouched, but user code failed: start over from storage next time.
        {:stop, {:shutdown, :user_code_crashed}, {:error, reason}, st}

      {:error, reason} ->
        {:reply, {:error, reason}, st}
    end
  end

  # decide -> encode -> evolve on st.state, nothing written: {:ok, encoded, new_state}, or
  # the error (a raise in user code as {:user_code_crashed, where, text}).
  defp decide_and_fold(st, decide, opts, s) do
    with {:ok, decision} <- run_user(fn -> decide.(st.state) end, :handle),
         {:ok, events} <- decision,
         {:ok, encoded} <- encode(List.wrap(events), opts, s, st.id),
         {:ok, new_state} <-
           run_user(fn -> Enum.reduce(encoded.events, st.state, &st.aggregate.apply(&2, &1)) end, :apply),
         do: {:ok, encoded, new_state}
  end

  defp encode([], _opts, _s, _id), do: {:ok, %{events: [], encoded: [], bytes: 0}}
  defp encode(events, opts, s, id), do: Codec.encode_events(events, Keyword.get(opts, :metadata), s, id)

  defp persist(_s, st, %{encoded: []}, _new_state, _decide, opts, _retries) do
    # Nothing written: the token of no events covers nothing new.
    {:reply, empty_answer(st.seq, opts), st}
  end

  defp persist(s, st, encoded, new_state, decide, opts, retries) do
    case EventLog.append_encoded(s, st.id, st.seq, encoded, commit_wait(s, opts), Keyword.get(opts, :kuma_command_id)) do
      {:ok, Native.appended(first_seq: first)} = {:ok, appended} when first != st.seq + 1 ->
        # Cluster mode: the answer of an earlier attempt of the same command (it was
        # committed, then its caller tried again). What we decided now was not written:
        # answer the first outcome and reload from storage.
        {:stop, {:shutdown, :stale}, EventLog.answer(appended, opts), st}

      {:ok, Native.appended(last_seq: last, hash: hash) = appended} ->
        before = st.seq
        st = %{st | state: new_state, seq: last, hash: hash}
        publish(s, st)
        maybe_snapshot(s, st, before)
        {:reply, EventLog.answer(appended, opts), st}

      {:error, {:outcome_unknown, _}} = error ->
        # Cluster mode: maybe written, maybe not: our state may be behind; reload next time.
        {:stop, {:shutdown, :stale}, error, st}

      {:error, {:wrong_expected_seq, _, _}} when retries > 0 ->
        # Someone wrote to the stream without going through us (store-level API while we
        # were starting): reload and decide again, a few times at most (an idempotent
        # command found among what was written is not run again).
        case Loader.load(s, st.aggregate, st.id) do
          {:ok, loaded} ->
            st = %{st | state: loaded.state, seq: loaded.seq, hash: loaded.hash}
            publish(s, st)

            case applied(st, opts) do
              {:ok, true} -> {:reply, empty_answer(st.seq, opts), st}
              _ -> write(st, decide, opts, retries - 1)
            end

          {:error, reason} ->
            {:stop, {:shutdown, {:load_failed, reason}}, {:error, reason}, st}
        end

      {:error, {:wrong_expected_seq, _, _} = reason} ->
        {:stop, {:shutdown, :stale}, {:error, reason}, st}

      {:error, :timeout} = error ->
        # No answer from the writer even after commit_wait: the append may yet commit, so
        # our state may be behind; start over from storage next time.
        {:stop, {:shutdown, :stale}, error, st}

      {:error, reason} ->
        {:reply, {:error, reason}, st}
    end
  end

  # How long we wait for our own append's commit. Single node: not the caller's timeout
  # (the caller stops waiting for us at its own timeout; we must not stop waiting for the
  # writer, or we would not know what storage holds, and an idempotent command's check
  # after a timeout relies on our knowing), only a bound against a writer that never
  # answers. Cluster mode: the caller's, as the leader's log decides the outcome there.
  @commit_wait :timer.minutes(5)
  defp commit_wait(%Store{cluster: nil}, _opts), do: @commit_wait
  defp commit_wait(_s, opts), do: Keyword.get(opts, :timeout, EventLog.default_timeout())

  defp decide(aggregate, state, command) do
    case aggregate.handle(state, command) do
      {:ok, events} ->
        {:ok, events}

      {:error, reason} ->
        {:error, reason}

      other ->
        raise ArgumentError,
              "#{inspect(aggregate)}.handle/2 returned #{inspect(other)}, expected {:ok, events} or {:error, reason}"
    end
  end

  # {:ok, whatever fun returned}, or the crash as an error (nothing has been written yet).
  defp run_user(fun, where) do
    {:ok, fun.()}
  catch
    kind, reason ->
      {:error, {:user_code_crashed, where, Loader.format(kind, reason, __STACKTRACE__)}}
  end

  defp publish(s, st) do
    :ets.insert(s.entities, {st.id, self(), st.aggregate, st.state, st.seq, :atomics.get(s.epoch, 1)})
  end

  # A snapshot each time the seq crosses a multiple of snapshot_every (fire and forget).
  defp maybe_snapshot(%Store{snapshot_every: every} = s, st, before) when is_integer(every) do
    if div(st.seq, every) > div(before, every) do
      # Sensitive values go to disk sealed, never in clear (Kuma.Codec.encode_term/2).
      with {:ok, data} <- Codec.encode_term(st.state, s),
           :ok <- EventLog.snapshot(s, st.id, st.seq, Aggregate.snapshot_version(st.aggregate), st.hash, data) do
        :ok
      else
        {:error, reason} ->
          Logger.warning(
            "Kuma: a snapshot (#{inspect(st.aggregate)}, seq #{st.seq}) was refused: #{Kuma.Error.format(reason)}"
          )
      end
    end
  end

  defp maybe_snapshot(_s, _st, _before), do: :ok

  defp same_aggregate(_st, :any), do: :ok
  defp same_aggregate(%{aggregate: a}, a), do: :ok
  defp same_aggregate(%{aggregate: live}, _other), do: {:error, {:aggregate_mismatch, live}}

  defp handles_commands(st) do
    if function_exported?(st.aggregate, :handle, 2), do: :ok, else: {:error, {:no_handle, st.aggregate}}
  end

  defp expected(st, opts) do
    case Keyword.get(opts, :expected_seq) do
      nil -> :ok
      seq when seq == st.seq -> :ok
      seq -> {:error, {:wrong_expected_seq, seq, st.seq}}
    end
  end
end
