defmodule Kuma.PersistentSubscription do
  @moduledoc """
  Named subscriptions to the store-wide order whose position is stored durably and moved
  by acknowledgements from the consumers (`Kuma.subscribe_persistent/3`, `Kuma.ack/2`,
  `Kuma.nack/3`, `Kuma.delete_subscription/2`): what event handlers and process managers
  of frameworks need (docs/frameworks.md). Single node (the store-wide order).

  * **Consumers.** A process joins with `Kuma.subscribe_persistent(store, name, opts)` and
    receives `{:kuma_event, subscription, envelope}` (envelopes carry `:global`). Several
    consumers of one subscription compete: each event goes to one of them. At most
    `:max_consumers` (default 10) at a time.
  * **Acknowledgements.** A consumer acknowledges each event (`Kuma.ack/2`) once handled.
    At most `:max_in_flight` events (default 100) are delivered and not yet acknowledged,
    across consumers. `Kuma.nack(subscription, event, :retry)` hands an event out again,
    `:skip` counts it as handled.
  * **Partitions.** With `partition_by: :entity_id`, the events of one entity go to one
    consumer (the one the entity's id hashes to among the current consumers), one at a
    time, in order: the next only after the one before was acknowledged (other entities'
    events go on meanwhile). When consumers join or leave, an entity may move to another
    consumer, still in order.
  * **Durability: at least once, never a skipped event.** The subscription's position is
    the global position up to which every event was acknowledged. It is stored in
    `<data_dir>/subscriptions.kuma` within 100 ms of moving (and when the subscription
    stops); after a restart or `kill -9` delivery resumes after the stored position, so an
    event acknowledged in the last moments before a crash may come again, and one not
    acknowledged always does. A consumer that exits has its unacknowledged events handed
    to the others.
  * **Options** `:from` (`:start`, `:now`, or a global position), `:max_in_flight`,
    `:max_consumers` and `:partition_by` take effect when the subscription is created
    (first join); later joins use the stored ones.
  """

  use GenServer, restart: :temporary

  alias Kuma.{Native, Store, Validate}

  @save_ms 100
  @page 500
  @file_name "subscriptions.kuma"

  @typedoc "A persistent subscription, as `Kuma.subscribe_persistent/3` returns it."
  @type t :: pid()

  # -- API (through Kuma) ----------------------------------------------------------------

  @doc false
  @spec join(Store.t(), String.t(), keyword()) :: {:ok, t()} | {:error, term()}
  def join(%Store{cluster: nil} = s, name, opts) do
    with :ok <- check_name(name),
         :ok <- Validate.keys(opts, [:from, :max_in_flight, :max_consumers, :partition_by]),
         {:ok, settings} <- settings(opts),
         do: join_started(s, name, settings, 3)
  end

  def join(%Store{}, _name, _opts),
    do: {:error, {:invalid, :global_order, "persistent subscriptions follow the store-wide order: single node only"}}

  # A subscription that just ended may still be registered for a moment: start it again.
  defp join_started(s, name, settings, attempts) do
    with {:ok, pid} <- ensure_started(s, name, settings) do
      case GenServer.call(pid, {:join, self()}) do
        :ok -> {:ok, pid}
        {:error, reason} -> {:error, reason}
      end
    end
  catch
    :exit, _ when attempts > 1 ->
      Process.sleep(10)
      join_started(s, name, settings, attempts - 1)

    :exit, _ ->
      {:error, {:unknown_subscription, name}}
  end

  @doc false
  @spec ack(t(), Kuma.Envelope.t() | pos_integer()) :: :ok | {:error, term()}
  def ack(sub, event), do: call(sub, {:ack, self(), global(event)})

  @doc false
  @spec nack(t(), Kuma.Envelope.t() | pos_integer(), :retry | :skip) :: :ok | {:error, term()}
  def nack(sub, event, action) when action in [:retry, :skip], do: call(sub, {:nack, self(), global(event), action})
  def nack(_sub, _event, _action), do: {:error, {:invalid, :action, "must be :retry or :skip"}}

  @doc false
  @spec leave(t()) :: :ok | {:error, term()}
  def leave(sub), do: call(sub, {:leave, self()})

  @doc false
  @spec delete(Store.t(), String.t()) :: :ok | {:error, term()}
  def delete(%Store{} = s, name) do
    with :ok <- check_name(name) do
      case whereis(s, name) do
        nil -> :ok
        pid -> GenServer.stop(pid, {:shutdown, :deleted})
      end

      with_db(s, fn db ->
        case Native.sqldb_query(db, "SELECT 1 FROM subscriptions WHERE name = ?1", [name], 5_000) do
          {:ok, {_, []}} ->
            {:error, {:unknown_subscription, name}}

          {:ok, _} ->
            with {:ok, _} <- Native.sqldb_transaction(db, [{"DELETE FROM subscriptions WHERE name = ?1", [name]}]),
                 do: :ok

          error ->
            error
        end
      end)
    end
  catch
    :exit, _ -> :ok
  end

  @doc false
  @spec info(t()) :: {:ok, map()} | {:error, term()}
  def info(sub), do: call(sub, :info)

  defp call(sub, message) do
    GenServer.call(sub, message)
  catch
    :exit, _ -> {:error, {:unknown_subscription, sub}}
  end

  defp global(%Kuma.Envelope{global: g}), do: g
  defp global(g), do: g

  defp check_name(name) when is_binary(name) and name != "" and byte_size(name) <= 255, do: :ok
  defp check_name(_), do: {:error, {:invalid, :name, "must be a non-empty string of at most 255 bytes"}}

  defp settings(opts) do
    s = %{
      from: Keyword.get(opts, :from, :start),
      max_in_flight: Keyword.get(opts, :max_in_flight, 100),
      max_consumers: Keyword.get(opts, :max_consumers, 10),
      partition_by: Keyword.get(opts, :partition_by)
    }

    cond do
      not (s.from in [:start, :now] or (is_integer(s.from) and s.from >= 0)) ->
        {:error, {:invalid, :from, "must be :start, :now or a global position"}}

      not (is_integer(s.max_in_flight) and s.max_in_flight in 1..100_000) ->
        {:error, {:invalid, :max_in_flight, "must be an integer in 1..100,000"}}

      not (is_integer(s.max_consumers) and s.max_consumers in 1..10_000) ->
        {:error, {:invalid, :max_consumers, "must be an integer in 1..10,000"}}

      s.partition_by not in [nil, :entity_id] ->
        {:error, {:invalid, :partition_by, "must be nil or :entity_id"}}

      true ->
        {:ok, s}
    end
  end

  defp via(s, name), do: {:via, Registry, {Kuma.Registry, {s.name, :persistent, name}}}

  defp whereis(s, name) do
    case Registry.lookup(Kuma.Registry, {s.name, :persistent, name}) do
      [{pid, _}] -> pid
      [] -> nil
    end
  end

  defp ensure_started(s, name, settings) do
    case whereis(s, name) do
      nil ->
        spec = %{
          id: make_ref(),
          start: {GenServer, :start_link, [__MODULE__, {s.name, name, settings}, [name: via(s, name)]]},
          restart: :temporary
        }

        case DynamicSupervisor.start_child(Store.via(s.name, :projections), spec) do
          {:ok, pid} -> {:ok, pid}
          {:error, {:already_started, pid}} -> {:ok, pid}
          {:error, reason} -> {:error, reason}
        end

      pid ->
        {:ok, pid}
    end
  end

  defp with_db(s, fun) do
    with {:ok, db} <- open_db(s) do
      try do
        fun.(db)
      after
        Native.sqldb_close(db)
      end
    end
  end

  # -- the server ------------------------------------------------------------------------
  #
  # `events`: a gb_tree of the events read and not yet acknowledged, by global position:
  # {:pending | {:in_flight, consumer}, envelope}. `position`: every event up to it is
  # acknowledged (what is stored); `read_to`: the order was read up to here.

  @impl true
  def init({store_name, name, settings}) do
    Process.flag(:trap_exit, true)
    {:ok, s} = Store.lookup(store_name)

    with {:ok, end_pos} <- Kuma.global_position(s),
         {:ok, db} <- open_db(s),
         {:ok, row} <- load_or_create(db, name, settings, end_pos) do
      Kuma.Feed.follow_order(s)

      st = %{
        store: store_name,
        name: name,
        db: db,
        position: row.position,
        saved: row.position,
        read_to: row.position,
        max_in_flight: row.max_in_flight,
        max_consumers: row.max_consumers,
        partition_by: row.partition_by,
        events: :gb_trees.empty(),
        in_flight: 0,
        consumers: %{},
        keys_busy: MapSet.new(),
        save_timer: nil
      }

      {:ok, st}
    else
      {:error, reason} -> {:stop, reason}
    end
  end

  defp open_db(s) do
    with {:ok, db} <- Native.sqldb_open(Path.join(s.data_dir, @file_name), s.file_mode),
         {:ok, _} <-
           Native.sqldb_transaction(db, [
             {"CREATE TABLE IF NOT EXISTS subscriptions (name TEXT PRIMARY KEY NOT NULL, position INTEGER NOT NULL, " <>
                "max_in_flight INTEGER NOT NULL, max_consumers INTEGER NOT NULL, partition_by TEXT, created INTEGER NOT NULL)",
              []}
           ]),
         do: {:ok, db}
  end

  defp load_or_create(db, name, settings, end_pos) do
    case Native.sqldb_query(
           db,
           "SELECT position, max_in_flight, max_consumers, partition_by FROM subscriptions WHERE name = ?1",
           [name],
           5_000
         ) do
      {:ok, {_, [[position, max_in_flight, max_consumers, partition_by]]}} ->
        {:ok,
         %{
           position: position,
           max_in_flight: max_in_flight,
           max_consumers: max_consumers,
           partition_by: if(partition_by == "entity_id", do: :entity_id)
         }}

      {:ok, {_, []}} ->
        with {:ok, position} <- Kuma.GlobalSubscription.start_at(settings.from, end_pos),
             {:ok, _} <-
               Native.sqldb_transaction(db, [
                 {"INSERT INTO subscriptions(name, position, max_in_flight, max_consumers, partition_by, created) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                  [
                    name,
                    position,
                    settings.max_in_flight,
                    settings.max_consumers,
                    if(settings.partition_by, do: "entity_id"),
                    System.os_time(:microsecond)
                  ]}
               ]) do
          {:ok, Map.put(settings, :position, position)}
        end

      error ->
        error
    end
  end

  @impl true
  def handle_call({:join, pid}, _from, st) do
    cond do
      Map.has_key?(st.consumers, pid) ->
        {:reply, :ok, st}

      map_size(st.consumers) >= st.max_consumers ->
        {:reply, {:error, {:too_many_consumers, st.max_consumers}}, st}

      true ->
        st = %{st | consumers: Map.put(st.consumers, pid, %{ref: Process.monitor(pid), in_flight: 0})}
        {:reply, :ok, pump(st)}
    end
  end

  def handle_call({:ack, pid, global}, _from, st) do
    case in_flight_of(st, pid, global) do
      {:ok, envelope} -> {:reply, :ok, st |> done(global, envelope, pid) |> pump()}
      error -> {:reply, error, st}
    end
  end

  def handle_call({:nack, pid, global, action}, _from, st) do
    case in_flight_of(st, pid, global) do
      {:ok, envelope} when action == :skip ->
        {:reply, :ok, st |> done(global, envelope, pid) |> pump()}

      {:ok, envelope} ->
        st =
          st
          |> release(envelope, pid)
          |> Map.update!(:events, &:gb_trees.update(global, {:pending, envelope}, &1))

        {:reply, :ok, pump(st)}

      error ->
        {:reply, error, st}
    end
  end

  def handle_call({:leave, pid}, _from, st), do: {:reply, :ok, st |> drop_consumer(pid) |> pump()}

  def handle_call(:info, _from, st) do
    {:reply,
     {:ok,
      %{
        name: st.name,
        position: st.position,
        read_to: st.read_to,
        in_flight: st.in_flight,
        consumers: map_size(st.consumers),
        max_in_flight: st.max_in_flight,
        max_consumers: st.max_consumers,
        partition_by: st.partition_by
      }}, st}
  end

  @impl true
  def handle_info({:kuma_order, _store, _watermark}, st), do: {:noreply, pump(st)}
  def handle_info(:save, st), do: {:noreply, save(%{st | save_timer: nil})}
  def handle_info({:DOWN, _ref, :process, pid, _}, st), do: {:noreply, st |> drop_consumer(pid) |> pump()}
  def handle_info(_other, st), do: {:noreply, st}

  @impl true
  def terminate({:shutdown, :deleted}, st), do: Native.sqldb_close(st.db)

  def terminate(_reason, st) do
    save(st)
    Native.sqldb_close(st.db)
  end

  defp in_flight_of(st, pid, global) do
    case is_integer(global) and :gb_trees.lookup(global, st.events) do
      {:value, {{:in_flight, ^pid}, envelope}} -> {:ok, envelope}
      _ -> {:error, {:not_in_flight, global}}
    end
  end

  # An acknowledged event leaves; the position moves over every acknowledged event at the
  # front (with nothing left in front, up to what was read).
  defp done(st, global, envelope, pid) do
    st = release(st, envelope, pid)
    events = :gb_trees.delete(global, st.events)

    position = if :gb_trees.is_empty(events), do: st.read_to, else: elem(:gb_trees.smallest(events), 0) - 1

    schedule_save(%{st | events: events, position: max(position, st.position)})
  end

  defp release(st, envelope, pid) do
    consumers = Map.update!(st.consumers, pid, &%{&1 | in_flight: &1.in_flight - 1})
    keys = if st.partition_by, do: MapSet.delete(st.keys_busy, envelope.entity_id), else: st.keys_busy
    %{st | consumers: consumers, in_flight: st.in_flight - 1, keys_busy: keys}
  end

  # A consumer gone: its events are handed out again.
  defp drop_consumer(st, pid) do
    case Map.pop(st.consumers, pid) do
      {nil, _} ->
        st

      {c, consumers} ->
        Process.demonitor(c.ref, [:flush])

        {events, freed, keys} =
          Enum.reduce(:gb_trees.to_list(st.events), {st.events, 0, st.keys_busy}, fn
            {g, {{:in_flight, ^pid}, e}}, {events, n, keys} ->
              {:gb_trees.update(g, {:pending, e}, events), n + 1, MapSet.delete(keys, e.entity_id)}

            _, acc ->
              acc
          end)

        %{st | consumers: consumers, events: events, in_flight: st.in_flight - freed, keys_busy: keys}
    end
  end

  # Reads ahead while there is room, then hands out pending events to consumers with room.
  defp pump(st) do
    st = read_more(st)
    dispatch(st)
  end

  defp read_more(st) do
    room = 2 * st.max_in_flight - :gb_trees.size(st.events)

    if room > 0 and map_size(st.consumers) > 0 do
      case Kuma.read_all(st.store, after: st.read_to, limit: min(room, @page)) do
        {:ok, envelopes, searched} ->
          events = Enum.reduce(envelopes, st.events, &:gb_trees.insert(&1.global, {:pending, &1}, &2))
          st = %{st | events: events, read_to: searched}
          st = if :gb_trees.is_empty(events), do: schedule_save(%{st | position: max(st.position, searched)}), else: st
          if envelopes != [] and length(envelopes) >= min(room, @page), do: read_more(st), else: st

        {:error, _} ->
          st
      end
    else
      st
    end
  end

  defp dispatch(%{consumers: consumers} = st) when map_size(consumers) == 0, do: st

  defp dispatch(st) do
    {st, _blocked} =
      Enum.reduce_while(:gb_trees.to_list(st.events), {st, MapSet.new()}, fn
        _, {st, blocked} when st.in_flight >= st.max_in_flight ->
          {:halt, {st, blocked}}

        {g, {:pending, e}}, {st, blocked} ->
          key = e.entity_id

          cond do
            st.partition_by && (MapSet.member?(st.keys_busy, key) or MapSet.member?(blocked, key)) ->
              # An earlier event of this entity is out (or waits): this one waits too.
              {:cont, {st, MapSet.put(blocked, key)}}

            true ->
              {:cont, {hand_out(st, g, e), blocked}}
          end

        {_g, {{:in_flight, _}, e}}, {st, blocked} ->
          {:cont, {st, if(st.partition_by, do: MapSet.put(blocked, e.entity_id), else: blocked)}}
      end)

    st
  end

  # Partitioned: to the consumer the entity hashes to among the current ones (so one
  # entity's events go to one consumer while the consumers stay the same). Otherwise: to
  # the consumer with the fewest events out.
  defp hand_out(st, global, envelope) do
    pid =
      if st.partition_by do
        pids = st.consumers |> Map.keys() |> Enum.sort()
        Enum.at(pids, :erlang.phash2(envelope.entity_id, length(pids)))
      else
        st.consumers |> Enum.min_by(fn {_pid, c} -> c.in_flight end) |> elem(0)
      end

    send(pid, {:kuma_event, self(), envelope})
    consumers = Map.update!(st.consumers, pid, &%{&1 | in_flight: &1.in_flight + 1})
    keys = if st.partition_by, do: MapSet.put(st.keys_busy, envelope.entity_id), else: st.keys_busy

    %{
      st
      | events: :gb_trees.update(global, {{:in_flight, pid}, envelope}, st.events),
        consumers: consumers,
        in_flight: st.in_flight + 1,
        keys_busy: keys
    }
  end

  defp schedule_save(%{save_timer: nil} = st) when st.position != st.saved,
    do: %{st | save_timer: Process.send_after(self(), :save, @save_ms)}

  defp schedule_save(st), do: st

  defp save(%{position: p, saved: p} = st), do: st

  defp save(st) do
    case Native.sqldb_transaction(st.db, [
           {"UPDATE subscriptions SET position = ?2 WHERE name = ?1", [st.name, st.position]}
         ]) do
      {:ok, _} -> %{st | saved: st.position}
      {:error, _} -> schedule_save(st)
    end
  end
end
