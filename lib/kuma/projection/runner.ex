defmodule Kuma.Projection.Runner do
  @moduledoc false
  # The process behind every projection, read model and subscription. It reads the shards
  # from its checkpoint in position order (catch-up), and once caught up sleeps until the
  # store's Feed tells it of a commit (live); both are the same loop, so there is no switch
  # over where an event could be lost or doubled.
  #
  # Per batch (one shard, up to :batch_size matching events):
  #   read -> decode -> hand each event to user code -> commit progress -> answer waiters.
  # "Commit progress" is one SQLite transaction in the projection's own file holding the
  # checkpoint and, for a read model, every statement the batch produced. User code never
  # crashes this process: an exception or bad return is a failure of that one event, which
  # is retried with backoff, then parked or stops the projection (:on_error).
  use GenServer
  require Logger

  alias Kuma.{Codec, Native, Position, Store}

  @max_backoff 30_000
  @lag_poll 10

  def child_spec(spec) do
    %{
      id: {__MODULE__, spec.name},
      start: {__MODULE__, :start_link, [spec]},
      restart: spec.restart,
      shutdown: 30_000
    }
  end

  def start_link(%{kind: :subscription} = spec), do: GenServer.start_link(__MODULE__, spec)

  def start_link(spec) do
    GenServer.start_link(__MODULE__, spec, name: {:via, Registry, {Kuma.Registry, {:projection, spec.name}, %{}}})
  end

  # -- start ---------------------------------------------------------------------------------

  @impl true
  def init(spec) do
    Process.flag(:trap_exit, true)

    with {:ok, s} <- Store.lookup(spec.store) do
      heads = Kuma.Feed.follow(s)

      st =
        Map.merge(spec, %{
          store_name: s.name,
          shards: s.shards,
          heads: heads,
          checkpoint: zero(s.shards),
          db: nil,
          user: nil,
          status: :running,
          failure: nil,
          retry_timer: nil,
          pump_scheduled: false,
          last_shard: -1,
          waiters: %{},
          ahead: %{},
          lagging: false,
          handled: 0
        })

      case spec.kind do
        :subscription -> init_subscription(st)
        _ -> init_durable(st, s)
      end
    end
  end

  defp init_subscription(st) do
    Process.monitor(st.subscriber)
    checkpoint = Map.merge(st.checkpoint, if(st.from == :now, do: st.heads, else: st.from))
    {:ok, schedule_pump(%{st | checkpoint: checkpoint})}
  end

  defp init_durable(st, s) do
    with {:ok, db} <- Native.sqldb_open(st.path),
         st = %{st | db: db},
         :ok <- prepare_file(st, s),
         {:ok, st} <- load_checkpoint(st),
         {:ok, st} <- init_output(st) do
      Registry.update_value(Kuma.Registry, {:projection, st.name}, fn _ -> %{db: db, kind: st.kind, store: s.name} end)
      :ok = Kuma.Erasure.listen(s.name)
      {:ok, schedule_pump(st)}
    else
      {:error, reason} ->
        if st.db, do: Native.sqldb_close(st.db)
        {:stop, reason}
    end
  end

  @bookkeeping [
    "CREATE TABLE IF NOT EXISTS _kuma_meta (key TEXT PRIMARY KEY NOT NULL, value ANY) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS _kuma_checkpoint (shard INTEGER PRIMARY KEY, pos INTEGER NOT NULL)",
    """
    CREATE TABLE IF NOT EXISTS _kuma_parked (
      shard INTEGER NOT NULL, pos INTEGER NOT NULL, entity_id BLOB NOT NULL, seq INTEGER NOT NULL,
      type TEXT NOT NULL, error TEXT NOT NULL, attempts INTEGER NOT NULL, parked_at INTEGER NOT NULL,
      PRIMARY KEY (shard, pos))
    """
  ]

  # Kuma's tables, and a check that the file belongs to this store and this projection.
  defp prepare_file(st, s) do
    with {:ok, _} <- Native.sqldb_transaction(st.db, Enum.map(@bookkeeping, &{&1, []})),
         {:ok, {_, rows}} <- Native.sqldb_query(st.db, "SELECT key, value FROM _kuma_meta", []) do
      meta = Map.new(rows, fn [k, v] -> {k, v} end)
      want = %{"store_id" => s.store_id, "kind" => Atom.to_string(st.kind), "module" => inspect(st.module)}

      case Enum.find(want, fn {k, v} -> Map.has_key?(meta, k) and meta[k] != v end) do
        nil ->
          inserts = for {k, v} <- want, do: {"INSERT OR IGNORE INTO _kuma_meta VALUES (?1, ?2)", [k, v]}
          with {:ok, _} <- Native.sqldb_transaction(st.db, inserts), do: :ok

        {key, value} ->
          {:error, {:foreign_projection, st.path, "#{key} is #{inspect(meta[key])}, expected #{inspect(value)}"}}
      end
    end
  end

  defp load_checkpoint(%{checkpoint_mode: :memory} = st) do
    with {:ok, _} <- Native.sqldb_transaction(st.db, [{"DELETE FROM _kuma_checkpoint", []}]), do: {:ok, st}
  end

  defp load_checkpoint(st) do
    with {:ok, {_, rows}} <- Native.sqldb_query(st.db, "SELECT shard, pos FROM _kuma_checkpoint", []) do
      {:ok, %{st | checkpoint: Enum.reduce(rows, st.checkpoint, fn [shard, pos], acc -> Map.put(acc, shard, pos) end)}}
    end
  end

  # A read model's schema (idempotent: CREATE ... IF NOT EXISTS is the author's job, or
  # Kuma runs it only on a fresh file); a projection's init/1.
  defp init_output(%{kind: :read_model} = st) do
    with {:ok, {_, rows}} <- Native.sqldb_query(st.db, "SELECT value FROM _kuma_meta WHERE key = 'schema'", []) do
      case rows do
        [] ->
          schema = Enum.map(List.wrap(st.module.schema()), &{&1, []})

          case Native.sqldb_transaction(st.db, schema ++ [{"INSERT INTO _kuma_meta VALUES ('schema', 'created')", []}]) do
            {:ok, _} -> {:ok, st}
            {:error, reason} -> {:error, {:invalid_schema, st.module, reason}}
          end

        _ ->
          {:ok, st}
      end
    end
  end

  defp init_output(%{kind: :projection} = st) do
    case user(fn -> st.module.init(st.args) end) do
      {:ok, {:ok, user}} ->
        {:ok, %{st | user: user}}

      {:ok, other} ->
        {:ok, stop_with(st, nil, {:bad_return, :init, other})}

      {:error, error} ->
        {:ok, stop_with(st, nil, error)}
    end
  end

  # -- messages ------------------------------------------------------------------------------

  @impl true
  def handle_info(:pump, st), do: pump(%{st | pump_scheduled: false})

  def handle_info(:retry, st), do: pump(%{st | retry_timer: nil, pump_scheduled: false})

  def handle_info({:kuma_commit, _store, shard, pos}, st) do
    st = %{st | heads: Map.update(st.heads, shard, pos, &max(&1, pos))}
    {:noreply, schedule_pump(st)}
  end

  def handle_info({:kuma_forget, _store, entity_id, reply_to}, st) do
    # A batch read ahead before the erasure committed may hold the entity's events; handled
    # after this, it would put back what forget removes. Drop it: the next read comes from
    # storage, where those events are gone.
    case forget(drop_read_ahead(st), entity_id) do
      {:ok, st} ->
        Kuma.Erasure.forgotten(reply_to)
        {:noreply, forget_failure(st, entity_id)}

      {:error, error, st} ->
        Logger.error("Kuma projection #{inspect(st.name)} could not forget an erased entity: #{format(error)}")
        {:noreply, st}
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
  def handle_info({:DOWN, _ref, :process, pid, _reason}, %{subscriber: pid} = st), do: {:stop, :normal, st}
  def handle_info(_other, st), do: {:noreply, st}

  @impl true
  def handle_call(:status, _from, st), do: {:reply, status(st), st}

  def handle_call({:wait_for, token, timeout}, from, st) do
    if Position.covers?(st.checkpoint, token) do
      {:reply, :ok, st}
    else
      ref = make_ref()
      if timeout != :infinity, do: Process.send_after(self(), {:wait_timeout, ref}, timeout)
      {:noreply, %{st | waiters: Map.put(st.waiters, ref, {token, from})}}
    end
  end

  def handle_call({:reset, position}, _from, st) do
    checkpoint = Map.merge(zero(st.shards), position)

    case save_checkpoint(st, checkpoint, []) do
      :ok -> {:reply, :ok, resume(%{st | checkpoint: checkpoint})}
      {:error, reason} -> {:reply, {:error, reason}, st}
    end
  end

  # The event it was stuck on was erased: nothing to park (and nothing of it may be kept).
  def handle_call(:skip, _from, %{failure: %{event: nil, position: pos} = failure} = st) when is_integer(pos) do
    {:reply, {:ok, %{shard: failure.shard, position: pos, entity_id: nil, seq: failure.seq}}, resume(st)}
  end

  def handle_call(:skip, _from, %{failure: %{event: event} = failure} = st) when event != nil do
    case park(st, failure.shard, event, {:skipped, failure.error}, failure.attempts) do
      {:ok, st} ->
        {_id, seq, pos, _ts, _type, _meta, _payload, _hash} = event
        {:reply, {:ok, %{shard: failure.shard, position: pos, entity_id: elem(event, 0), seq: seq}}, resume(st)}

      {:error, reason, st} ->
        {:reply, {:error, reason}, st}
    end
  end

  def handle_call(:skip, _from, st), do: {:reply, {:error, :nothing_to_skip}, st}

  def handle_call(:rebuild, _from, st) do
    case rebuild(st) do
      {:ok, st} -> {:reply, :ok, resume(st)}
      {:error, reason} -> {:reply, {:error, reason}, st}
    end
  end

  def handle_call(:parked, _from, %{db: nil} = st), do: {:reply, {:ok, []}, st}

  def handle_call(:parked, _from, st) do
    sql =
      "SELECT shard, pos, entity_id, seq, type, error, attempts, parked_at FROM _kuma_parked ORDER BY parked_at, shard, pos"

    reply =
      with {:ok, {_, rows}} <- Native.sqldb_query(st.db, sql, []) do
        {:ok,
         Enum.map(rows, fn [shard, pos, id, seq, type, error, attempts, at] ->
           %{
             shard: shard,
             position: pos,
             entity_id: id,
             seq: seq,
             type: type,
             error: error,
             attempts: attempts,
             parked_at: at
           }
         end)}
      end

    {:reply, reply, st}
  end

  @impl true
  def terminate(_reason, st) do
    for {_ref, {_token, from}} <- st.waiters, do: GenServer.reply(from, {:error, :projection_stopped})
    if st.db, do: Native.sqldb_close(st.db)
    :ok
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
    case next_shard(st) do
      nil ->
        {:noreply, st}

      shard ->
        case room(st) do
          0 ->
            {:noreply, lagging(st)}

          room ->
            st = %{st | last_shard: shard, lagging: false}
            read(st, shard, room)
        end
    end
  end

  # The next shard with unread commits, round robin so one busy shard cannot starve others.
  defp next_shard(st) do
    behind = for s <- 0..(st.shards - 1), Map.get(st.heads, s, 0) > Map.fetch!(st.checkpoint, s), do: s
    Enum.find(behind, &(&1 > st.last_shard)) || List.first(behind)
  end

  # Subscriptions never let the subscriber's mailbox grow past :max_queue: beyond it they
  # stop reading (the events stay on disk) and look again shortly.
  defp room(%{kind: :subscription} = st) do
    case Process.info(st.subscriber, :message_queue_len) do
      {:message_queue_len, n} -> max(min(st.batch_size, st.max_queue - n), 0)
      nil -> 0
    end
  end

  defp room(st), do: st.batch_size

  defp lagging(%{lagging: true} = st) do
    Process.send_after(self(), :pump, @lag_poll)
    %{st | pump_scheduled: true}
  end

  defp lagging(st) do
    send(st.subscriber, {:kuma_lagged, st.checkpoint})
    lagging(%{st | lagging: true})
  end

  defp read(st, shard, room) do
    {:ok, s} = Store.lookup(st.store_name)
    after_pos = Map.fetch!(st.checkpoint, shard)
    {batch, st} = take_read_ahead(st, shard, after_pos, room)

    case batch || fetch(s, st.filter, shard, after_pos, room) do
      {:ok, {events, searched, envelopes}} ->
        st = %{st | heads: Map.update(st.heads, shard, searched, &max(&1, searched))}
        st = read_ahead(st, s, shard, searched, length(events) == room)
        st = handle_batch(st, s, shard, events, searched, envelopes)
        {:noreply, schedule_pump(answer_waiters(st))}

      {:error, reason} ->
        Logger.error("Kuma projection #{inspect(st.name)} could not read shard #{shard}: #{format(reason)}")
        {:noreply, %{st | retry_timer: Process.send_after(self(), :retry, 1_000)}}
    end
  end

  # One batch of a shard, read and decoded. Envelopes are nil when one did not decode: the
  # caller then decodes event by event and treats the failure as that event's.
  defp fetch(s, filter, shard, after_pos, room) do
    query = {after_pos, filter.types, filter.scope, filter.id_prefix, nil, nil}

    with {:ok, {events, searched}} <- Native.query_shard(s.native, shard, query, room) do
      envelopes =
        try do
          Enum.map(events, &Codec.envelope(&1, shard, s))
        catch
          _, _ -> nil
        end

      {:ok, {events, searched, envelopes}}
    end
  end

  # Read-ahead: while this process runs user code on one batch, a task reads and decodes
  # the next batch of the same shard (the NIF runs on a dirty scheduler, decoding on
  # another core), so catch-up uses both. A read-ahead batch is used only if it starts
  # exactly at the shard's checkpoint; anything else (reset, rebuild, a failure that kept
  # the checkpoint back) is dropped. At most one batch per shard is held.
  defp read_ahead(%{kind: :subscription} = st, _s, _shard, _after, _full?), do: st

  defp read_ahead(st, s, shard, after_pos, full?) do
    if full? and not Map.has_key?(st.ahead, shard) do
      {filter, room} = {st.filter, st.batch_size}
      task = Task.async(fn -> fetch(s, filter, shard, after_pos, room) end)
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
    {done, failed, st} = run_events(st, s, shard, events, envelopes)

    position =
      case {failed, done} do
        {nil, _} -> searched
        {_, []} -> Map.fetch!(st.checkpoint, shard)
        {_, done} -> done |> List.last() |> elem(0)
      end

    case commit(st, shard, position, done) do
      {:ok, st} ->
        st = %{st | handled: st.handled + length(done)}
        if failed, do: failure(st, shard, failed), else: clear_failure(st, shard)

      {:error, {pos, error}, st} ->
        # A statement failed: everything before its event is committed; that event failed.
        event = Enum.find(events, &(elem(&1, 2) == pos))
        failure(st, shard, {event, error})
    end
  end

  defp clear_failure(%{failure: %{shard: shard}} = st, shard), do: %{st | failure: nil}
  defp clear_failure(st, _shard), do: st

  # Each event through user code, in order, until one fails. `done` holds
  # {pos, statements} for every event handled (statements only for read models).
  defp run_events(st, s, shard, events, envelopes) do
    events
    |> Enum.zip(envelopes || List.duplicate(nil, length(events)))
    |> Enum.reduce_while({[], nil, st}, fn {event, envelope}, {done, nil, st} ->
      case run_event(st, s, shard, event, envelope) do
        {:ok, statements, st} -> {:cont, {[{elem(event, 2), statements} | done], nil, st}}
        {:error, error} -> {:halt, {done, {event, error}, st}}
      end
    end)
    |> then(fn {done, failed, st} -> {Enum.reverse(done), failed, st} end)
  end

  defp run_event(st, _s, _shard, _event, %Kuma.Envelope{} = envelope), do: deliver(st, envelope)

  defp run_event(st, s, shard, event, nil) do
    case user(fn -> Codec.envelope(event, shard, s) end) do
      {:ok, envelope} -> deliver(st, envelope)
      {:error, error} -> {:error, error}
    end
  end

  defp deliver(%{kind: :subscription} = st, envelope) do
    if st.filter.entity_id in [nil, envelope.entity_id], do: send(st.subscriber, {:kuma_event, envelope})
    {:ok, [], st}
  end

  defp deliver(%{kind: :projection} = st, envelope) do
    case user(fn -> st.module.handle_event(envelope, st.user) end) do
      {:ok, {:ok, user}} -> {:ok, [], %{st | user: user}}
      {:ok, other} -> {:error, {:bad_return, :handle_event, other}}
      {:error, error} -> {:error, error}
    end
  end

  defp deliver(%{kind: :read_model} = st, envelope) do
    case user(fn -> st.module.handle_event(envelope) end) do
      {:ok, statements} ->
        case Kuma.ReadModel.statements(statements) do
          {:ok, statements} -> {:ok, statements, st}
          :error -> {:error, {:bad_return, :handle_event, statements}}
        end

      {:error, error} ->
        {:error, error}
    end
  end

  # Progress to disk: the checkpoint, with a read model's statements in the same transaction.
  defp commit(%{kind: :subscription} = st, shard, position, _done) do
    {:ok, %{st | checkpoint: Map.put(st.checkpoint, shard, position)}}
  end

  defp commit(st, shard, position, done) do
    checkpoint = Map.put(st.checkpoint, shard, position)
    statements = Enum.flat_map(done, &elem(&1, 1))

    case save_checkpoint(st, checkpoint, statements, [shard]) do
      :ok ->
        {:ok, %{st | checkpoint: checkpoint}}

      {:error, _} when statements != [] ->
        commit_one_by_one(st, shard, done)

      {:error, reason} ->
        # The projection file itself failed (disk full?): nothing moved; try again later.
        Logger.error("Kuma projection #{inspect(st.name)} could not save its checkpoint: #{format(reason)}")
        {:ok, %{st | retry_timer: Process.send_after(self(), :retry, 1_000)}}
    end
  end

  # A batch's statements failed together: commit event by event to find the culprit.
  defp commit_one_by_one(st, shard, done) do
    Enum.reduce_while(done, {:ok, st}, fn {pos, statements}, {:ok, st} ->
      checkpoint = Map.put(st.checkpoint, shard, pos)

      case save_checkpoint(st, checkpoint, statements, [shard]) do
        :ok -> {:cont, {:ok, %{st | checkpoint: checkpoint}}}
        {:error, reason} -> {:halt, {:error, {pos, reason}, st}}
      end
    end)
  end

  defp save_checkpoint(st, checkpoint, statements, shards \\ nil)
  defp save_checkpoint(%{kind: :subscription}, _checkpoint, _statements, _shards), do: :ok

  defp save_checkpoint(st, checkpoint, statements, shards) do
    upserts =
      for {shard, pos} <- checkpoint, shards == nil or shard in shards do
        {"INSERT INTO _kuma_checkpoint VALUES (?1, ?2) ON CONFLICT(shard) DO UPDATE SET pos = excluded.pos",
         [shard, pos]}
      end

    case Native.sqldb_transaction(st.db, statements ++ upserts) do
      {:ok, _} -> :ok
      {:error, reason} -> {:error, reason}
    end
  end

  # -- failures ------------------------------------------------------------------------------

  defp failure(st, shard, {event, error}) do
    {id, seq, pos, _ts, _type, _meta, _payload, _hash} = event

    attempts =
      case st.failure do
        %{shard: ^shard, position: ^pos, attempts: n} -> n + 1
        _ -> 1
      end

    failure = %{shard: shard, position: pos, entity_id: id, seq: seq, error: error, attempts: attempts, event: event}

    where =
      "Kuma projection #{inspect(st.name)}: event #{seq} of entity #{inspect(id)} (shard #{shard}, position #{pos})"

    cond do
      attempts <= st.max_retries ->
        backoff = min(st.retry_backoff * Integer.pow(2, attempts - 1), @max_backoff)
        Logger.warning("#{where} failed (attempt #{attempts}, retrying in #{backoff} ms): #{format(error)}")
        %{st | failure: failure, retry_timer: Process.send_after(self(), :retry, backoff)}

      st.on_error == :park ->
        Logger.error("#{where} failed #{attempts} times and was parked: #{format(error)}")

        case park(st, shard, event, error, attempts) do
          {:ok, st} ->
            %{st | failure: nil}

          {:error, reason, st} ->
            Logger.error("#{where} could not be parked: #{format(reason)}")
            stop_with(st, failure, error)
        end

      true ->
        Logger.error("#{where} failed #{attempts} times; the projection stops (on_error: :stop): #{format(error)}")
        stop_with(st, failure, error)
    end
  end

  # A projection stuck on an event of an entity being erased lets go of the event (which
  # would otherwise live on in memory, and be parked by skip): retries read storage again,
  # where it is gone, and skip moves on without parking it.
  defp forget_failure(%{failure: %{entity_id: id} = failure} = st, id),
    do: %{st | failure: %{failure | event: nil, entity_id: nil, error: :entity_erased}}

  defp forget_failure(st, _entity_id), do: st

  defp stop_with(st, failure, error), do: %{st | status: :stopped, failure: failure || %{error: error}}

  # Records the event as parked and moves the checkpoint past it, in one transaction.
  defp park(st, shard, event, error, attempts) do
    {id, seq, pos, _ts, type, _meta, _payload, _hash} = event

    parked =
      {"INSERT OR REPLACE INTO _kuma_parked VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
       [shard, pos, {:blob, id}, seq, type, format(error), attempts, System.os_time(:microsecond)]}

    checkpoint = Map.put(st.checkpoint, shard, pos)

    case st.kind do
      :subscription ->
        {:ok, %{st | checkpoint: checkpoint}}

      _ ->
        case save_checkpoint(st, checkpoint, [parked], [shard]) do
          :ok -> {:ok, %{st | checkpoint: checkpoint}}
          {:error, reason} -> {:error, reason, st}
        end
    end
  end

  # -- erasure, rebuild, status --------------------------------------------------------------

  defp forget(st, entity_id) do
    id_param = {:blob, entity_id}
    parked = {"DELETE FROM _kuma_parked WHERE entity_id = ?1", [id_param]}

    with {:ok, statements, st} <- forget_output(st, entity_id),
         {:ok, _} <- Native.sqldb_transaction(st.db, statements ++ [parked]),
         {:ok, _} <- Native.sqldb_truncate_wal(st.db) do
      {:ok, st}
    else
      {:error, error, st} -> {:error, error, st}
      {:error, error} -> {:error, error, st}
    end
  end

  defp forget_output(%{kind: :read_model} = st, entity_id) do
    case user(fn -> st.module.forget(entity_id) end) do
      {:ok, :default} ->
        with {:ok, statements} <- Kuma.ReadModel.default_forget(st.db, entity_id), do: {:ok, statements, st}

      {:ok, statements} ->
        case Kuma.ReadModel.statements(statements) do
          {:ok, statements} -> {:ok, statements, st}
          :error -> {:error, {:bad_return, :forget, statements}, st}
        end

      {:error, error} ->
        {:error, error, st}
    end
  end

  defp forget_output(%{kind: :projection} = st, entity_id) do
    if function_exported?(st.module, :forget, 2) do
      case user(fn -> st.module.forget(entity_id, st.user) end) do
        {:ok, {:ok, user}} -> {:ok, [], %{st | user: user}}
        {:ok, other} -> {:error, {:bad_return, :forget, other}, st}
        {:error, error} -> {:error, error, st}
      end
    else
      {:ok, [], st}
    end
  end

  defp rebuild(%{kind: :read_model} = st) do
    {:ok, s} = Store.lookup(st.store_name)
    Kuma.Erasure.unlisten(s.name)
    Native.sqldb_close(st.db)
    for suffix <- ["", "-wal", "-shm"], do: File.rm(st.path <> suffix)

    case init_durable(%{st | db: nil, checkpoint: zero(st.shards), failure: nil}, s) do
      {:ok, st} -> {:ok, st}
      {:stop, reason} -> {:error, reason}
    end
  end

  defp rebuild(%{kind: :projection} = st) do
    zero = zero(st.shards)

    with {:ok, _} <- Native.sqldb_transaction(st.db, [{"DELETE FROM _kuma_parked", []}]),
         :ok <- save_checkpoint(st, zero, []),
         {:ok, st} <- init_output(%{st | checkpoint: zero, status: :running, failure: nil}) do
      {:ok, st}
    end
  end

  # Position 0 in every shard: before the first event.
  defp zero(shards), do: Map.new(0..(shards - 1), &{&1, 0})

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
      name: st.name,
      kind: st.kind,
      store: st.store_name,
      status: state,
      position: st.checkpoint,
      heads: st.heads,
      lag: lag,
      handled: st.handled,
      parked: parked_count(st),
      failure: st.failure && Map.take(st.failure, [:shard, :position, :entity_id, :seq, :attempts, :error])
    }
  end

  defp parked_count(%{db: nil}), do: 0

  defp parked_count(st) do
    case Native.sqldb_query(st.db, "SELECT count(*) FROM _kuma_parked", []) do
      {:ok, {_, [[n]]}} -> n
      _ -> 0
    end
  end

  defp answer_waiters(%{waiters: waiters} = st) when map_size(waiters) == 0, do: st

  defp answer_waiters(st) do
    {ready, waiting} =
      Enum.split_with(st.waiters, fn {_ref, {token, _from}} -> Position.covers?(st.checkpoint, token) end)

    for {_ref, {_token, from}} <- ready, do: GenServer.reply(from, :ok)
    %{st | waiters: Map.new(waiting)}
  end

  # -- user code -----------------------------------------------------------------------------

  # Runs user code; an exception, exit or throw becomes {:error, {:raised, message}}.
  defp user(fun) do
    {:ok, fun.()}
  catch
    kind, reason -> {:error, {:raised, Exception.format(kind, reason, __STACKTRACE__)}}
  end

  defp format({:raised, text}), do: text
  defp format({:bad_return, callback, value}), do: "#{callback} returned #{inspect(value, limit: 20)}"
  defp format({:skipped, error}), do: "skipped by an operator after: " <> format(error)
  defp format(other), do: Kuma.format_error(other)
end
