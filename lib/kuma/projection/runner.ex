defmodule Kuma.Projection.Runner do
  @moduledoc false
  # The process behind every projection, read model and subscription. It reads the shards
  # from its checkpoint in position order (catch-up), and once caught up sleeps until the
  # store's Feed tells it of a commit (live); both are the same loop, so there is no switch
  # over where an event could be lost or doubled.
  #
  # Per batch (one shard, up to :batch_size matching events):
  #   read -> decode -> hand each event to the sink -> commit progress -> answer waiters.
  # What differs between projections, read models and subscriptions is the sink's
  # (Kuma.Projection.Sink); what to do about a failed event is decided by
  # Kuma.Projection.Failure, as data, and carried out here (`carry_out/2`). User code never
  # crashes this process: an exception or bad return is a failure of that one event.
  use GenServer
  require Logger

  alias Kuma.{Codec, Position, Query, Store}
  alias Kuma.Projection.{Failure, Spec}
  require Kuma.Native

  @lag_poll 10

  # Cluster mode: how often a projection's checkpoint is saved in the metadata group.
  @share_ms 1_000

  defmodule State do
    @moduledoc false
    # `checkpoint`: the position handled and committed in every shard; `hashes`: the chain
    # hash of the event stored at each of those positions (nil if unknown); `heads`: the last
    # commits the runner knows of; `failure`: the event it is stuck on (retrying or
    # stopped); `ahead`: per shard, a batch read ahead ({after, room, task | {:done, result}}).
    @enforce_keys [:spec, :store_name, :shards, :sink, :heads, :checkpoint]
    defstruct @enforce_keys ++
                [
                  hashes: %{},
                  status: :running,
                  failure: nil,
                  retry_timer: nil,
                  pump_scheduled: false,
                  last_shard: -1,
                  waiters: %{},
                  ahead: %{},
                  lagging: false,
                  handled: 0,
                  shared: nil
                ]

    @type t :: %__MODULE__{
            spec: Spec.t(),
            store_name: atom(),
            shards: pos_integer(),
            sink: term(),
            heads: Kuma.Position.t(),
            checkpoint: Kuma.Position.t(),
            hashes: %{non_neg_integer() => binary() | nil},
            status: :running | :stopped,
            failure: Failure.t() | %{error: term()} | nil,
            retry_timer: reference() | nil,
            pump_scheduled: boolean(),
            last_shard: integer(),
            waiters: %{reference() => {Kuma.Position.t(), GenServer.from()}},
            ahead: map(),
            lagging: boolean(),
            handled: non_neg_integer(),
            shared: {integer(), reference() | nil} | nil
          }
  end

  def child_spec(%Spec{} = spec) do
    %{
      id: {__MODULE__, spec.name},
      start: {__MODULE__, :start_link, [spec]},
      restart: spec.restart,
      shutdown: 30_000
    }
  end

  def start_link(%Spec{kind: :subscription} = spec), do: GenServer.start_link(__MODULE__, spec)

  def start_link(%Spec{} = spec) do
    GenServer.start_link(__MODULE__, spec, name: {:via, Registry, {Kuma.Registry, {:projection, spec.name}, %{}}})
  end

  # -- start ---------------------------------------------------------------------------------

  @impl true
  def init(%Spec{} = spec) do
    Process.flag(:trap_exit, true)

    with {:ok, s} <- Store.lookup(spec.store) do
      heads = follow(s, spec)
      # What Kuma.Projection.stop/1 and Kuma.ReadModel.query/3 look up (subscriptions are
      # not registered, so this changes nothing for them).
      Registry.update_value(Kuma.Registry, {:projection, spec.name}, fn _ -> %{store: s.name, kind: spec.kind} end)

      case spec.sink.open(spec, s) do
        {:ok, sink, marks, stopped} ->
          if spec.sink.durable?(), do: :ok = Kuma.Erasure.listen(s.name)
          stored = Map.new(marks, fn {shard, {pos, _hash}} -> {shard, pos} end)
          start = if spec.from == :now, do: heads, else: Map.merge(spec.from, stored)
          start = only_its_shard(s, spec, start, heads)

          st = %State{
            spec: spec,
            store_name: s.name,
            shards: s.shards,
            sink: sink,
            heads: heads,
            checkpoint: Map.merge(zero(s.shards), start),
            hashes: Map.new(marks, fn {shard, {_pos, hash}} -> {shard, hash} end)
          }

          {:ok, st |> stop_if(stopped || diverged(s, marks)) |> schedule_pump()}

        {:error, reason} ->
          {:stop, reason}
      end
    end
  end

  # A subscription to one entity follows that entity's commits only (Kuma.Feed,
  # follow_entity/2), on a single node; everything else follows every commit.
  defp follow(s, spec) do
    if own_shard(s, spec), do: Kuma.Feed.follow_entity(s, spec.query.entity_id), else: Kuma.Feed.follow(s)
  end

  # The one shard a subscription to one entity reads (nil: it follows every commit).
  defp own_shard(%Store{cluster: nil} = s, %Spec{kind: :subscription, query: %{entity_id: id}}) when is_binary(id),
    do: Kuma.Native.store_shard_for(s.native, id)

  defp own_shard(_s, _spec), do: nil

  # An entity lives in one shard: the others hold nothing for it, so its subscription is at
  # their heads from the start (and, told only of its entity's commits, stays there until
  # a waiter has it learn newer heads).
  defp only_its_shard(s, spec, positions, heads) do
    case own_shard(s, spec) do
      nil ->
        positions

      own ->
        Map.new(positions, fn {shard, pos} ->
          {shard, if(shard == own, do: pos, else: max(pos, Map.get(heads, shard, pos)))}
        end)
    end
  end

  # Position 0 in every shard: before the first event.
  defp zero(shards), do: Map.new(0..(shards - 1), &{&1, 0})

  defp stop_if(st, nil), do: st

  defp stop_if(st, error) do
    Logger.error("Kuma projection #{inspect(st.spec.name)} stopped: #{format(error)}")
    %{st | status: :stopped, failure: %{error: error}}
  end

  # Whether a shard no longer holds the events the checkpoint was taken after: the event
  # stored at the checkpoint's position must be the one read then (same chain hash), or be
  # gone with the shard still reaching that far (erased). A shard that lost the tail of its
  # WAL (`sync: :normal` and an OS crash) gives those positions out again: reading on from
  # the checkpoint would skip the events that took them, so the projection stops instead
  # (rebuild or reset it).
  # In cluster mode this cannot happen: a shard's positions follow from its Raft log,
  # and a copy that lost its tail applies the same entries again, to the same positions.
  defp diverged(%Store{cluster: %{}}, _marks), do: nil

  defp diverged(s, marks) do
    Enum.find_value(Enum.sort(marks), fn
      {_shard, {pos, hash}} when pos == 0 or hash == nil ->
        nil

      {shard, {pos, hash}} ->
        case Query.read_position(s, shard, pos) do
          {:ok, {^hash, _last}} -> nil
          {:ok, {nil, last}} when pos <= last -> nil
          {:ok, {_other, last}} -> {:shard_diverged, shard, pos, last}
          {:error, reason} -> reason
        end
    end)
  end

  # -- messages ------------------------------------------------------------------------------

  @impl true
  def handle_info(:pump, st), do: pump(%{st | pump_scheduled: false})

  def handle_info(:retry, st), do: pump(%{st | retry_timer: nil, pump_scheduled: false})

  def handle_info(:share, st), do: {:noreply, share_checkpoint(%{st | shared: {elem(st.shared, 0), nil}})}

  def handle_info({:kuma_commit, _store, shard, pos}, st) do
    st = %{st | heads: Map.update(st.heads, shard, pos, &max(&1, pos))}
    {:noreply, schedule_pump(st)}
  end

  # A commit that wrote the one entity we follow: its first event in the commit is at
  # `first`, the entity's event before that at `prev`. If we have read past `prev`, nothing
  # of the entity lies between us and `first`: read on from just before it (from the
  # shard's tail in memory, not from wherever we stopped). Never past an event we are
  # stuck on or have not read.
  def handle_info({:kuma_entity_commit, _store, shard, pos, first, prev}, st) do
    checkpoint = Map.fetch!(st.checkpoint, shard)

    st =
      if st.failure == nil and checkpoint >= prev and checkpoint < first - 1,
        do: %{st | checkpoint: Map.put(st.checkpoint, shard, first - 1), hashes: Map.put(st.hashes, shard, nil)},
        else: st

    handle_info({:kuma_commit, st.store_name, shard, pos}, st)
  end

  def handle_info({:kuma_forget, _store, entity_id, reply_to}, st) do
    # A batch read ahead before the erasure committed may hold the entity's events; handled
    # after this, it would put back what forget removes. Drop it: the next read comes from
    # storage, where those events are gone.
    st = drop_read_ahead(st)

    case st.spec.sink.forget(st.sink, entity_id) do
      {:ok, sink} ->
        Kuma.Erasure.forgotten(reply_to)
        {:noreply, %{st | sink: sink, failure: Failure.forgotten(st.failure, entity_id)}}

      {:error, error, sink} ->
        Logger.error("Kuma projection #{inspect(st.spec.name)} could not forget an erased entity: #{format(error)}")
        {:noreply, %{st | sink: sink}}
    end
  end

  def handle_info({:wait_timeout, ref}, st) do
    case Map.pop(st.waiters, ref) do
      {nil, _} ->
        {:noreply, st}

      {{_token, from}, waiters} ->
        GenServer.reply(from, {:error, :timeout})
        {:noreply, %{st | waiters: waiters}}
    end
  end

  def handle_info({ref, result}, st) when is_reference(ref), do: {:noreply, read_ahead_done(st, ref, result)}

  def handle_info({:DOWN, _ref, :process, pid, _reason}, %{spec: %{subscriber: pid}} = st), do: {:stop, :normal, st}

  def handle_info(_other, st), do: {:noreply, st}

  @impl true
  def handle_call(:status, _from, st), do: {:reply, status(st), st}

  def handle_call({:wait_for, token, timeout}, from, st) do
    if Position.covers?(st.checkpoint, token) do
      {:reply, :ok, st}
    else
      ref = make_ref()
      if timeout != :infinity, do: Process.send_after(self(), {:wait_timeout, ref}, timeout)
      {:noreply, %{st | waiters: Map.put(st.waiters, ref, {token, from})} |> learn_heads()}
    end
  end

  def handle_call({:reset, position}, _from, st) do
    {:ok, s} = Store.lookup(st.store_name)
    checkpoint = Map.merge(zero(st.shards), position)
    hashes = Map.new(checkpoint, fn {shard, pos} -> {shard, hash_at(s, shard, pos)} end)
    marks = Map.new(checkpoint, fn {shard, pos} -> {shard, {pos, hashes[shard]}} end)

    case st.spec.sink.save(st.sink, marks) do
      :ok -> {:reply, :ok, %{st | checkpoint: checkpoint, hashes: hashes} |> share_now() |> resume()}
      {:error, reason} -> {:reply, {:error, reason}, st}
    end
  end

  def handle_call(:skip, _from, %{failure: %Failure{} = failure} = st) do
    skipped = %{shard: failure.shard, position: failure.position, entity_id: failure.entity_id, seq: failure.seq}

    # An erased entity's event is not parked: nothing of it may be kept.
    parked =
      if failure.entity_id == nil,
        do: :ok,
        else: st.spec.sink.park(st.sink, %{failure | error: {:skipped, failure.error}})

    case parked do
      :ok -> {:reply, {:ok, skipped}, resume(past(st, failure))}
      {:error, reason} -> {:reply, {:error, reason}, st}
    end
  end

  def handle_call(:skip, _from, st), do: {:reply, {:error, :nothing_to_skip}, st}

  def handle_call(:rebuild, _from, st) do
    {:ok, s} = Store.lookup(st.store_name)
    st = drop_read_ahead(st)

    case st.spec.sink.rebuild(st.sink, st.spec, s) do
      {:ok, sink, _marks, stopped} ->
        st = %{st | sink: sink, checkpoint: zero(st.shards), hashes: %{}, failure: nil, status: :running}
        {:reply, :ok, st |> share_now() |> resume() |> stop_if(stopped)}

      {:error, reason} ->
        {:reply, {:error, reason}, st}
    end
  end

  def handle_call(:parked, _from, st), do: {:reply, st.spec.sink.parked(st.sink), st}

  @impl true
  def terminate(_reason, st) do
    for {_ref, {_token, from}} <- st.waiters, do: GenServer.reply(from, {:error, :projection_stopped})
    save_shared(st)
    st.spec.sink.close(st.sink)
  end

  # Cluster mode: a projection's checkpoint is also saved in the metadata group, at most
  # every second (and once more when it stops), so that the node that takes it over resumes
  # from there (Kuma.Cluster.Projections). The metadata group takes it only from the owner
  # of the current epoch. Read models keep theirs with their rows, on their node.
  defp share_checkpoint(%{spec: %{epoch: epoch, kind: :projection, checkpoint: :durable}} = st) when epoch != nil do
    now = System.monotonic_time(:millisecond)

    case st.shared do
      {_at, timer} when timer != nil ->
        st

      {at, nil} when now - at < @share_ms ->
        %{st | shared: {at, Process.send_after(self(), :share, @share_ms - (now - at))}}

      _ ->
        spawn(fn -> save_shared(st) end)
        %{st | shared: {now, nil}}
    end
  end

  defp share_checkpoint(st), do: st

  # A checkpoint moved back (reset, rebuild) is saved before the call returns: a node
  # taking over must not resume from the one before.
  defp share_now(st) do
    with {_at, timer} when timer != nil <- st.shared, do: Process.cancel_timer(timer)
    save_shared(st)
    %{st | shared: {System.monotonic_time(:millisecond), nil}}
  end

  defp save_shared(%{spec: %{epoch: epoch, kind: :projection, checkpoint: :durable}} = st) when epoch != nil do
    with {:ok, %Store{cluster: %{} = c}} <- Store.lookup(st.store_name) do
      Kuma.Cluster.Meta.command(c, {:projection_checkpoint, st.spec.name, epoch, st.checkpoint}, 2_000)
    end
  end

  defp save_shared(_st), do: :ok

  # A follower of one entity is not told of other commits, so its heads lag the shards':
  # a waiter for a position past them has them learned now. The entity's shard is then
  # read that far; the other shards hold nothing for it, so it moves to their heads at once.
  defp learn_heads(st) do
    with {:ok, s} <- Store.lookup(st.store_name), own when own != nil <- own_shard(s, st.spec) do
      heads = Position.merge(st.heads, Kuma.Feed.heads(s))

      %{st | heads: heads, checkpoint: only_its_shard(s, st.spec, st.checkpoint, heads)}
      |> answer_waiters()
      |> schedule_pump()
    else
      _ -> st
    end
  end

  # [:kuma, :projection, :batch] (Kuma.Telemetry): a batch handled, and how far behind the
  # commits the runner knows of it still is.
  defp emit_batch(st, shard, events, duration) do
    Kuma.Telemetry.execute(
      [:kuma, :projection, :batch],
      %{duration: duration, events: events, lag: Position.behind(st.checkpoint, st.heads)},
      %{store: st.store_name, name: st.spec.name, shard: shard, kind: st.spec.kind}
    )
  end

  # -- the loop ------------------------------------------------------------------------------

  defp schedule_pump(%{pump_scheduled: true} = st), do: st
  defp schedule_pump(%{retry_timer: t} = st) when t != nil, do: st
  defp schedule_pump(%{status: :stopped} = st), do: st

  defp schedule_pump(st) do
    send(self(), :pump)
    %{st | pump_scheduled: true}
  end

  defp resume(st) do
    if st.retry_timer, do: Process.cancel_timer(st.retry_timer)
    st = drop_read_ahead(st)
    schedule_pump(answer_waiters(%{st | status: :running, failure: nil, retry_timer: nil}))
  end

  defp pump(%{status: :stopped} = st), do: {:noreply, st}

  defp pump(st) do
    with shard when shard != nil <- next_shard(st),
         room when room > 0 <- st.spec.sink.room(st.sink, st.spec.batch_size) do
      read(%{st | last_shard: shard, lagging: false}, shard, room)
    else
      nil -> {:noreply, st}
      0 -> {:noreply, lagging(st)}
    end
  end

  # The next shard to read: the one of the event being retried, so its attempts count up
  # to the decision (reading other shards in between would start them over, and a
  # projection failing in several shards would retry forever); else the next shard with
  # unread commits, round robin so one busy shard cannot starve others.
  defp next_shard(%{failure: %Failure{shard: shard}}), do: shard

  defp next_shard(st) do
    behind = for s <- 0..(st.shards - 1), Map.get(st.heads, s, 0) > Map.fetch!(st.checkpoint, s), do: s
    Enum.find(behind, &(&1 > st.last_shard)) || List.first(behind)
  end

  # The sink cannot take events now (a subscriber's mailbox is full): the events stay on
  # disk; the sink is told once, and the runner looks again shortly.
  defp lagging(%{lagging: true} = st) do
    Process.send_after(self(), :pump, @lag_poll)
    %{st | pump_scheduled: true}
  end

  defp lagging(st) do
    st.spec.sink.full(st.sink, st.checkpoint)
    lagging(%{st | lagging: true})
  end

  defp read(st, shard, room) do
    {:ok, s} = Store.lookup(st.store_name)
    after_pos = Map.fetch!(st.checkpoint, shard)
    {batch, st} = take_read_ahead(st, shard, after_pos, room)

    case batch || fetch(s, st.spec.query, shard, after_pos, room) do
      {:ok, {events, searched, hash, envelopes}} ->
        st = %{st | heads: Map.update(st.heads, shard, searched, &max(&1, searched))}
        st = read_ahead(st, s, shard, searched, length(events) == room)
        t0 = Kuma.Telemetry.listening?() && System.monotonic_time()
        st = handle_batch(st, s, shard, events, {searched, hash}, envelopes)
        if t0, do: emit_batch(st, shard, length(events), System.monotonic_time() - t0)
        {:noreply, st |> answer_waiters() |> share_checkpoint() |> schedule_pump()}

      {:error, reason} ->
        Logger.error("Kuma projection #{inspect(st.spec.name)} could not read shard #{shard}: #{format(reason)}")
        {:noreply, %{st | retry_timer: Process.send_after(self(), :retry, 1_000)}}
    end
  end

  # One batch of a shard, read and decoded. Envelopes are nil when one did not decode: the
  # caller then decodes event by event and treats the failure as that event's.
  defp fetch(s, query, shard, after_pos, room) do
    with {:ok, {events, searched, hash}} <- Query.read_shard(s, shard, after_pos, query, room) do
      envelopes =
        try do
          Enum.map(events, &Codec.envelope(&1, s))
        catch
          _, _ -> nil
        end

      {:ok, {events, searched, hash, envelopes}}
    end
  end

  # Read-ahead: while this process runs user code on one batch, a task reads and decodes
  # the next batch of the same shard (the NIF runs on a dirty scheduler, decoding on
  # another core), so catch-up uses both. A read-ahead batch is used only if it starts
  # exactly at the shard's checkpoint; anything else (reset, rebuild, a failure that kept
  # the checkpoint back) is dropped. At most one batch per shard is held.
  defp read_ahead(st, s, shard, after_pos, full?) do
    if full? and st.spec.sink.durable?() and not Map.has_key?(st.ahead, shard) do
      {query, room} = {st.spec.query, st.spec.batch_size}
      task = Task.async(fn -> fetch(s, query, shard, after_pos, room) end)
      %{st | ahead: Map.put(st.ahead, shard, {after_pos, room, task})}
    else
      st
    end
  end

  defp take_read_ahead(st, shard, after_pos, room) do
    case Map.pop(st.ahead, shard) do
      {nil, _} ->
        {nil, st}

      {{^after_pos, ^room, {:done, result}}, ahead} ->
        {result, %{st | ahead: ahead}}

      {{^after_pos, ^room, %Task{} = task}, ahead} ->
        {Task.await(task, :infinity), %{st | ahead: ahead}}

      {{_stale, _room, task}, ahead} ->
        shutdown(task)
        {nil, %{st | ahead: ahead}}
    end
  end

  # A read-ahead finished while this process was busy elsewhere: keep its result.
  defp read_ahead_done(st, ref, result) do
    case Enum.find(st.ahead, fn {_shard, {_after, _room, task}} -> match?(%Task{ref: ^ref}, task) end) do
      {shard, {after_pos, room, _task}} ->
        Process.demonitor(ref, [:flush])
        %{st | ahead: Map.put(st.ahead, shard, {after_pos, room, {:done, result}})}

      nil ->
        st
    end
  end

  defp drop_read_ahead(st) do
    for {_shard, {_after, _room, task}} <- st.ahead, do: shutdown(task)
    %{st | ahead: %{}}
  end

  defp shutdown(%Task{} = task), do: Task.shutdown(task, :brutal_kill)
  defp shutdown({:done, _result}), do: :ok

  defp handle_batch(st, s, shard, events, searched, envelopes) do
    {done, failed, st} = run_events(st, s, events, envelopes)

    mark =
      case {failed, done} do
        {nil, _} -> searched
        {_, []} -> mark(st, shard)
        {_, done} -> done |> List.last() |> then(fn {pos, hash, _} -> {pos, hash} end)
      end

    case st.spec.sink.commit(st.sink, shard, mark, done) do
      :ok ->
        st = %{moved(st, shard, mark) | handled: st.handled + length(done)}
        if failed, do: failed(st, failed), else: clear_failure(st, shard)

      {:error, {:at, pos, error}} ->
        # A statement failed: everything before its event is committed; that event failed.
        committed = done |> Enum.take_while(fn {p, _, _} -> p < pos end)

        mark =
          if committed == [], do: mark(st, shard), else: committed |> List.last() |> then(fn {p, h, _} -> {p, h} end)

        st = %{moved(st, shard, mark) | handled: st.handled + length(committed)}
        failed(st, {Enum.find(events, &(Kuma.Native.event(&1, :position) == pos)), error})

      {:error, reason} ->
        # The projection's file itself failed (disk full?): nothing moved; try again later.
        Logger.error("Kuma projection #{inspect(st.spec.name)} could not save its checkpoint: #{format(reason)}")
        %{st | retry_timer: Process.send_after(self(), :retry, 1_000)}
    end
  end

  # The shard's checkpoint as a mark, and the state with the shard's checkpoint moved.
  defp mark(st, shard), do: {Map.fetch!(st.checkpoint, shard), Map.get(st.hashes, shard)}

  defp moved(st, shard, {pos, hash}),
    do: %{st | checkpoint: Map.put(st.checkpoint, shard, pos), hashes: Map.put(st.hashes, shard, hash)}

  defp hash_at(_s, _shard, 0), do: nil

  defp hash_at(s, shard, pos) do
    case Query.read_position(s, shard, pos) do
      {:ok, {hash, _last}} -> hash
      _ -> nil
    end
  end

  defp clear_failure(%{failure: %Failure{shard: shard}} = st, shard), do: %{st | failure: nil}
  defp clear_failure(st, _shard), do: st

  # Each event through the sink, in order, until one fails. `done` holds {position, hash,
  # work} for every event handled.
  defp run_events(st, s, events, envelopes) do
    events
    |> Enum.zip(envelopes || List.duplicate(nil, length(events)))
    |> Enum.reduce_while({[], nil, st}, fn {event, envelope}, {done, nil, st} ->
      case handle_event(st, s, event, envelope) do
        {:ok, work, st} ->
          Kuma.Native.event(position: pos, hash: hash) = event
          {:cont, {[{pos, hash, work} | done], nil, st}}

        {:error, error} ->
          {:halt, {done, {event, error}, st}}
      end
    end)
    |> then(fn {done, failed, st} -> {Enum.reverse(done), failed, st} end)
  end

  defp handle_event(st, s, event, nil) do
    case Kuma.Projection.Sink.user(fn -> Codec.envelope(event, s) end) do
      {:ok, envelope} -> handle_event(st, s, event, envelope)
      {:error, error} -> {:error, error}
    end
  end

  defp handle_event(st, _s, _event, envelope) do
    with {:ok, work, sink} <- st.spec.sink.handle(st.sink, envelope), do: {:ok, work, %{st | sink: sink}}
  end

  # -- failures ------------------------------------------------------------------------------

  defp failed(st, {event, error}) do
    Kuma.Native.event(shard: shard, position: pos, entity_id: id, seq: seq, type: type, hash: hash) = event
    at = %{shard: shard, position: pos, entity_id: id, seq: seq, type: type, hash: hash}

    carry_out(
      st,
      Failure.decide(failure_or_nil(st), at, error, Map.take(st.spec, [:max_retries, :retry_backoff, :on_error]))
    )
  end

  defp failure_or_nil(%{failure: %Failure{} = f}), do: f
  defp failure_or_nil(_st), do: nil

  # The effects of a decision. Logs name the event by its place (shard, position, seq) and
  # the failure by its kind only: entity ids and what user code raised (which may quote the
  # event) stay out of logs, which erasure cannot reach; Kuma.Projection.status/1 and
  # parked/1 show them, and forget them when the entity is erased.
  defp carry_out(st, {:retry, backoff, failure}) do
    Logger.warning(
      "#{where(st, failure)} failed (attempt #{failure.attempts}, retrying in #{backoff} ms): #{kind(failure.error)}"
    )

    %{st | failure: failure, retry_timer: Process.send_after(self(), :retry, backoff)}
  end

  defp carry_out(st, {:park, failure}) do
    Logger.error("#{where(st, failure)} failed #{failure.attempts} times and was parked: #{kind(failure.error)}")

    case st.spec.sink.park(st.sink, failure) do
      :ok ->
        %{past(st, failure) | failure: nil}

      {:error, reason} ->
        Logger.error("#{where(st, failure)} could not be parked: #{format(reason)}")
        %{st | status: :stopped, failure: failure}
    end
  end

  defp carry_out(st, {:stop, failure}) do
    Logger.error(
      "#{where(st, failure)} failed #{failure.attempts} times; the projection stops (on_error: :stop): #{kind(failure.error)}"
    )

    %{st | status: :stopped, failure: failure}
  end

  # The checkpoint past a failed event.
  defp past(st, %Failure{shard: shard, position: pos, hash: hash}), do: moved(st, shard, {pos, hash})

  defp where(st, f),
    do: "Kuma projection #{inspect(st.spec.name)}: the event at shard #{f.shard}, position #{f.position} (seq #{f.seq})"

  # -- status --------------------------------------------------------------------------------

  defp status(st) do
    lag = Position.behind(st.checkpoint, st.heads)

    state =
      cond do
        st.status == :stopped -> :stopped
        st.failure != nil -> :retrying
        lag > 0 -> :catching_up
        true -> :live
      end

    %{
      name: st.spec.name,
      kind: st.spec.kind,
      store: st.store_name,
      status: state,
      position: st.checkpoint,
      heads: st.heads,
      lag: lag,
      handled: st.handled,
      parked: st.spec.sink.parked_count(st.sink),
      failure: Failure.public(st.failure)
    }
  end

  defp answer_waiters(%{waiters: waiters} = st) when map_size(waiters) == 0, do: st

  defp answer_waiters(st) do
    {ready, waiting} =
      Enum.split_with(st.waiters, fn {_ref, {token, _from}} -> Position.covers?(st.checkpoint, token) end)

    for {_ref, {_token, from}} <- ready, do: GenServer.reply(from, :ok)
    %{st | waiters: Map.new(waiting)}
  end

  defp format(reason), do: Kuma.Error.format(reason)

  # What kind of failure, without its details (see carry_out/2).
  defp kind({:raised, text}) do
    case Regex.run(~r/\*\* \(([\w.]+)\)/, text) do
      [_, exception] -> "#{exception} raised (details in Kuma.Projection.status/1)"
      nil -> "user code failed (details in Kuma.Projection.status/1)"
    end
  end

  defp kind({:bad_return, callback, _value}), do: "#{callback} returned something else than {:ok, state}"
  defp kind({:sql, index, _message}), do: "SQL statement #{inspect(index)} failed (details in Kuma.Projection.status/1)"
  defp kind(other), do: format(other)
end
