defmodule Kuma.EventLog do
  @moduledoc false
  # The store's event log as Elixir sees it: every write to the shards and every read of
  # one entity's events goes through here (queries across entities: Kuma.Query). Above it,
  # Kuma.Router decides whether a write goes through a live entity; entity processes,
  # erasure, export and loading call this module directly.
  #
  # Writes are queued to the shard's writer thread by a NIF that returns at once; the
  # commit is answered with {:kuma_reply, ref, answer} (await/2). Large writes are decoded
  # on a dirty CPU scheduler: decoding and copying cost ~0.25 µs per event and ~1 µs per
  # 4 KiB on the 2-core machine (docs/benchmarks.md, "NIF call cost"), so these thresholds
  # keep a normal scheduler near 20 µs (p50) and under 100 µs (p99).

  alias Kuma.{Codec, Native, Store}
  alias Kuma.Cluster.{Proposer, Route}
  require Native

  @default_timeout 30_000
  # The process dictionary key of the references whose answers came too late (await/2).
  @late :kuma_late_replies
  @dirty_events 100
  @dirty_bytes 64 * 1024
  # Events per read of one entity.
  @chunk 1000

  @doc "The default `:timeout` of writes, in ms."
  def default_timeout, do: @default_timeout

  # -- writes --------------------------------------------------------------------------------

  @doc """
  Encodes `events` and appends them to one entity, straight to storage (no live entity is
  consulted: see Kuma.Router). Options: `:expected_seq`, `:metadata`, `:timeout`.
  """
  @spec append(Store.t(), binary(), [term()], keyword()) :: {:ok, Native.appended()} | {:error, term()}
  def append(%Store{} = s, entity_id, events, opts) do
    with {:ok, expected} <- Kuma.Validate.expected_seq(Keyword.get(opts, :expected_seq)),
         {:ok, encoded} <- Codec.encode_events(events, Keyword.get(opts, :metadata), s) do
      timeout = Keyword.get(opts, :timeout, @default_timeout)
      append_encoded(s, entity_id, expected, encoded, timeout, Keyword.get(opts, :kuma_command_id))
    end
  end

  @doc """
  Appends events already encoded by `Kuma.Codec.encode_events/4`. Cluster mode: through
  the shard's log (this node must lead the shard, see Kuma.Cluster.Route), as the command
  `command_id` (a new one if nil).
  """
  @spec append_encoded(Store.t(), binary(), non_neg_integer() | nil, map(), timeout(), binary() | nil) ::
          {:ok, Native.appended()} | {:error, term()}
  def append_encoded(s, entity_id, expected, encoded, timeout, command_id \\ nil) do
    # [:kuma, :append, :stop | :exception] (Kuma.Telemetry): timed from here to the answer.
    Kuma.Telemetry.span([:kuma, :append], fn -> do_append(s, entity_id, expected, encoded, timeout, command_id) end, fn
      {:ok, Native.appended(shard: shard)} ->
        {%{events: length(encoded.encoded), bytes: encoded.bytes}, %{store: s.name, shard: shard, entity_id: entity_id}}

      {:error, reason} ->
        {:exception, %{}, %{store: s.name, entity_id: entity_id, reason: reason}}
    end)
  end

  defp do_append(%Store{cluster: nil} = s, entity_id, expected, %{encoded: encoded, bytes: bytes}, timeout, _cid) do
    write = if dirty?(length(encoded), bytes), do: &Native.write_append_dirty/5, else: &Native.write_append/5
    call(fn ref -> write.(s.native, ref, entity_id, expected, encoded) end, timeout)
  end

  defp do_append(%Store{} = s, entity_id, expected, %{encoded: encoded}, timeout, cid) do
    request = {:append, cid || command_id(), entity_id, expected, encoded}
    [answer] = Proposer.write(s, Route.shard(s, entity_id), [request], timeout)
    answer
  end

  defp command_id, do: Route.new_command_id()

  @doc """
  Appends to many entities in one call: `entries` are `{entity_id, expected, encoded}`
  (`encoded` from `Kuma.Codec.encode_events/4`). Returns `{:ok, [{:ok, appended} |
  {:error, reason}]}`, one per entry, in order.
  """
  @spec append_batch(Store.t(), [{binary(), non_neg_integer() | nil, map()}], timeout()) ::
          {:ok, [{:ok, Native.appended()} | {:error, term()}]} | {:error, term()}
  def append_batch(%Store{cluster: nil} = s, entries, timeout) do
    {raw, {count, bytes}} =
      Enum.map_reduce(entries, {0, 0}, fn {id, expected, %{encoded: e, bytes: b}}, {n, size} ->
        {{id, expected, e}, {n + length(e), size + b}}
      end)

    write = if dirty?(count, bytes), do: &Native.write_batch_dirty/3, else: &Native.write_batch/3

    # [:kuma, :append_batch, :stop] (Kuma.Telemetry): what of the batch committed.
    Kuma.Telemetry.span([:kuma, :append_batch], fn -> call(fn ref -> write.(s.native, ref, raw) end, timeout) end, fn
      {:ok, results} ->
        {ok, events, bytes} =
          Enum.zip(results, entries)
          |> Enum.reduce({0, 0, 0}, fn
            {{:ok, _}, {_, _, %{encoded: e, bytes: b}}}, {n, v, size} -> {n + 1, v + length(e), size + b}
            {_failed, _}, acc -> acc
          end)

        {%{entries: ok, failed: length(results) - ok, events: events, bytes: bytes}, %{store: s.name}}

      _ ->
        nil
    end)
  end

  # Cluster mode: each entry is {entity_id, expected, encoded, command_id}, of shards this
  # node leads; one log entry per shard.
  def append_batch(%Store{} = s, entries, timeout) do
    indexed = Enum.with_index(entries)

    answers =
      indexed
      |> Enum.group_by(fn {{id, _, _, _}, _i} -> Route.shard(s, id) end)
      |> Enum.flat_map(fn {shard, group} ->
        requests =
          for {{id, expected, %{encoded: e}, cid}, _i} <- group, do: {:append, cid || command_id(), id, expected, e}

        Enum.zip(Enum.map(group, &elem(&1, 1)), Proposer.write(s, shard, requests, timeout))
      end)

    {:ok, answers |> Enum.sort_by(&elem(&1, 0)) |> Enum.map(&elem(&1, 1))}
  end

  @doc false
  # Whether a write of this many events and bytes is decoded on a dirty scheduler (its NIF
  # could hold a normal one longer than ~100 µs).
  def dirty?(events, bytes), do: events > @dirty_events or bytes > @dirty_bytes

  @doc """
  Queues a snapshot of an entity's state at `seq` (whose event's chain hash is `hash`).
  The answer arrives later as `{:kuma_reply, ref, :ok | {:error, reason}}`, to be ignored
  or logged by the caller: a snapshot only speeds up loads.
  """
  @spec snapshot(Store.t(), binary(), pos_integer(), pos_integer(), binary(), binary()) :: :ok | {:error, term()}
  def snapshot(%Store{} = s, entity_id, seq, version, hash, data) do
    write = if byte_size(data) > @dirty_bytes, do: &Native.write_snapshot_dirty/7, else: &Native.write_snapshot/7

    snapshot_span(s, entity_id, seq, version, data, fn ->
      case write.(s.native, make_ref(), entity_id, seq, version, hash, data) do
        {:ok, :ok} -> :ok
        error -> error
      end
    end)
  end

  # [:kuma, :snapshot, :stop] (Kuma.Telemetry): a snapshot queued (an entity's) or committed
  # (a framework's).
  defp snapshot_span(s, entity_id, seq, version, data, fun) do
    Kuma.Telemetry.span([:kuma, :snapshot], fun, fn
      result when result in [:ok, {:ok, :ok}] ->
        {%{bytes: byte_size(data), seq: seq}, %{store: s.name, entity_id: entity_id, version: version}}

      _ ->
        nil
    end)
  end

  @doc """
  Stores a snapshot and waits for its commit (`Kuma.Snapshots`): `{:ok, :ok}` or
  `{:error, reason}`.
  """
  @spec save_snapshot(Store.t(), binary(), pos_integer(), non_neg_integer(), binary(), binary(), timeout()) ::
          {:ok, :ok} | {:error, term()}
  def save_snapshot(%Store{} = s, entity_id, seq, version, hash, data, timeout) do
    write = if byte_size(data) > @dirty_bytes, do: &Native.write_snapshot_dirty/7, else: &Native.write_snapshot/7

    snapshot_span(s, entity_id, seq, version, data, fn ->
      call(fn ref -> write.(s.native, ref, entity_id, seq, version, hash, data) end, timeout)
    end)
  end

  @doc "Deletes an entity's snapshots of `version` and waits: `{:ok, :ok}` or `{:error, reason}`."
  @spec delete_snapshots(Store.t(), binary(), non_neg_integer(), timeout()) :: {:ok, :ok} | {:error, term()}
  def delete_snapshots(%Store{} = s, entity_id, version, timeout) do
    call(fn ref -> Native.write_delete_snapshots(s.native, ref, entity_id, version) end, timeout)
  end

  @doc "Erases an entity in storage (see Kuma.Erasure): `{:ok, events_deleted}`."
  @spec erase(Store.t(), binary(), timeout()) :: {:ok, non_neg_integer()} | {:error, term()}
  def erase(%Store{cluster: nil} = s, entity_id, timeout) do
    Kuma.Telemetry.span(
      [:kuma, :erase],
      fn -> call(fn ref -> Native.write_erase(s.native, ref, entity_id) end, timeout) end,
      fn
        {:ok, count} when is_integer(count) -> {%{events: count}, %{store: s.name}}
        _ -> nil
      end
    )
  end

  # Cluster mode: through the shard's log, so that every replica erases it.
  def erase(%Store{} = s, entity_id, timeout) do
    [answer] = Proposer.write(s, Route.shard(s, entity_id), [{:erase, command_id(), entity_id}], timeout)
    answer
  end

  @doc "Compacts every shard, one at a time (`Kuma.compact/2`)."
  @spec compact(Store.t(), (non_neg_integer(), pos_integer() -> term()), timeout()) ::
          {:ok, %{shards: pos_integer()}} | {:error, term()}
  def compact(%Store{} = s, progress, timeout) do
    Enum.reduce_while(0..(s.shards - 1), :ok, fn shard, :ok ->
      case call(fn ref -> Native.write_compact(s.native, ref, shard) end, timeout) do
        {:ok, :ok} ->
          progress.(shard, s.shards)
          {:cont, :ok}

        error ->
          {:halt, error}
      end
    end)
    |> case do
      :ok -> {:ok, %{shards: s.shards}}
      error -> error
    end
  end

  @doc "Waits until every write queued before this call is committed, and checkpoints heads."
  @spec flush(Store.t()) :: :ok | {:error, term()}
  def flush(%Store{} = s) do
    with {:ok, :ok} <- Native.write_flush(s.native), do: :ok
  end

  # Queues a write and waits for its answer.
  defp call(queue, timeout) do
    drop_late_replies()
    ref = make_ref()

    case queue.(ref) do
      {:ok, :ok} -> await(ref, timeout)
      {:error, reason} -> {:error, reason}
    end
  end

  @doc """
  The writer thread's answer to a queued write (`{:kuma_reply, ref, answer}`). A write
  whose answer did not come in time still gets it later: its reference is remembered, and
  the caller's next write drops the late answer from the mailbox, so that a process whose
  writes time out does not fill its mailbox with them.
  """
  @spec await(reference(), timeout()) :: term()
  def await(ref, timeout) do
    receive do
      {:kuma_reply, ^ref, answer} -> answer
    after
      timeout ->
        Process.put(@late, [ref | Process.get(@late, [])])
        {:error, :timeout}
    end
  end

  # Drops the answers that came after their caller stopped waiting; keeps the references
  # of those still to come.
  defp drop_late_replies do
    case Process.get(@late) do
      nil ->
        :ok

      refs ->
        waiting =
          Enum.reject(refs, fn ref ->
            receive do
              {:kuma_reply, ^ref, _late} -> true
            after
              0 -> false
            end
          end)

        if waiting == [], do: Process.delete(@late), else: Process.put(@late, waiting)
        :ok
    end
  end

  @doc """
  What an append answers its caller: `{:ok, last_seq}`, or with `return: :token` also the
  `Kuma.Position` of the events written.
  """
  @spec answer(Native.appended(), keyword()) :: {:ok, pos_integer()} | {:ok, pos_integer(), Kuma.Position.t()}
  def answer(Native.appended(shard: shard, last_seq: last, last_pos: last_pos), opts) do
    case Keyword.get(opts, :return, :seq) do
      :token -> {:ok, last, %{shard => last_pos}}
      :seq -> {:ok, last}
    end
  end

  # -- reads of one entity -------------------------------------------------------------------

  @doc "The entity's head, or `nil` if it has no events."
  @spec head(Store.t(), binary()) ::
          {:ok, nil | %{seq: pos_integer(), position: pos_integer(), timestamp: integer(), hash: binary()}}
          | {:error, term()}
  def head(%Store{} = s, entity_id), do: Native.read_head(s.native, entity_id)

  @doc "Up to `max` events of an entity from seq `from`, as envelopes."
  @spec read(Store.t(), binary(), pos_integer(), pos_integer()) :: {:ok, [Kuma.Envelope.t()]} | {:error, term()}
  def read(%Store{} = s, entity_id, from, max) do
    with {:ok, events} <- Native.read_entity(s.native, entity_id, from, max) do
      {:ok, Enum.map(events, &Codec.envelope(&1, s))}
    end
  end

  @doc """
  Events of an entity as envelopes (`Kuma.events/3`, `Kuma.history/2`). Options: `:from`
  (seq, default 1), `:limit` (default all).
  """
  @spec events(Store.t(), binary(), keyword()) :: {:ok, [Kuma.Envelope.t()]} | {:error, term()}
  def events(%Store{} = s, entity_id, opts) do
    from = Keyword.get(opts, :from, 1)
    limit = Keyword.get(opts, :limit, :infinity)

    with :ok <- Kuma.Validate.keys(opts, [:from, :limit]),
         :ok <- Kuma.Validate.entity_id(entity_id),
         :ok <- Kuma.Validate.positive(:from, from),
         :ok <- if(limit == :infinity, do: :ok, else: Kuma.Validate.non_neg(:limit, limit)),
         {:ok, acc} <- decoding(fn -> reduce(s, entity_id, from, limit, [], &{:cont, [Codec.envelope(&1, s) | &2]}) end) do
      {:ok, Enum.reverse(acc)}
    end
  end

  @doc """
  Runs `fun`, turning an event that does not decode (`Kuma.DecodeError`) into `{:error,
  {:decode_failed, seq, :unknown_atom | :malformed}}`.
  """
  @spec decoding((() -> result)) :: result | {:error, term()} when result: term()
  def decoding(fun) do
    fun.()
  rescue
    e in Kuma.DecodeError -> {:error, {:decode_failed, e.seq, e.reason}}
  end

  @doc """
  Folds `fun` over up to `limit` (or all) stored events of an entity from seq `from`, in
  seq order, reading them in chunks. `fun` gets each `Kuma.Native.event` record and the
  accumulator and returns `{:cont, acc}` or `{:halt, {:error, reason}}`.
  """
  @spec reduce(Store.t(), binary(), pos_integer(), non_neg_integer() | :infinity, acc, fun) ::
          {:ok, acc} | {:error, term()}
        when acc: term(), fun: (Native.event(), acc -> {:cont, acc} | {:halt, {:error, term()}})
  def reduce(_s, _entity_id, _from, 0, acc, _fun), do: {:ok, acc}

  def reduce(%Store{} = s, entity_id, from, limit, acc, fun) do
    chunk = if limit == :infinity, do: @chunk, else: min(limit, @chunk)

    case Native.read_entity(s.native, entity_id, from, chunk) do
      {:ok, []} ->
        {:ok, acc}

      {:ok, events} ->
        case fold(events, acc, fun) do
          {:cont, acc} when length(events) < chunk ->
            {:ok, acc}

          {:cont, acc} ->
            left = if limit == :infinity, do: :infinity, else: limit - length(events)
            reduce(s, entity_id, Native.event(List.last(events), :seq) + 1, left, acc, fun)

          {:halt, error} ->
            error
        end

      error ->
        error
    end
  end

  defp fold([], acc, _fun), do: {:cont, acc}

  defp fold([event | rest], acc, fun) do
    case fun.(event, acc) do
      {:cont, acc} -> fold(rest, acc, fun)
      {:halt, _} = halt -> halt
    end
  end

  @doc """
  A lazy stream of an entity's events (`Kuma.stream/3`), read in chunks; raises
  `Kuma.Error` when a read fails. `store` is looked up at each chunk, so a stream of a
  stopped store fails at its next read.
  """
  @spec stream(Store.t() | Store.name(), binary(), pos_integer(), pos_integer()) :: Enumerable.t()
  def stream(store, entity_id, from, chunk) do
    Stream.resource(
      fn -> from end,
      fn
        :done ->
          {:halt, :done}

        seq ->
          with {:ok, s} <- Store.lookup(store), {:ok, events} <- page(s, entity_id, seq, chunk) do
            case events do
              [] -> {:halt, :done}
              events when length(events) < chunk -> {events, :done}
              events -> {events, List.last(events).seq + 1}
            end
          else
            {:error, reason} -> raise Kuma.Error, reason: reason
          end
      end,
      fn _ -> :ok end
    )
  end

  # Cluster mode: a page of the stream is read on the shard's leader (Kuma.events/3 routes).
  defp page(%Store{cluster: nil} = s, entity_id, seq, chunk), do: read(s, entity_id, seq, chunk)
  defp page(s, entity_id, seq, chunk), do: Kuma.events(s, entity_id, from: seq, limit: chunk)

  # -- integrity -----------------------------------------------------------------------------

  @doc "Recomputes an entity's chain (`Kuma.verify/2`)."
  @spec verify(Store.t(), binary()) :: {:ok, %{events: non_neg_integer(), hash: binary()}} | {:error, term()}
  def verify(%Store{} = s, entity_id) do
    case Native.read_verify_entity(s.native, entity_id) do
      {:ok, {:intact, verified}} -> {:ok, verified}
      {:ok, {:broken, %{seq: seq, why: why}}} -> {:error, {:tampered, seq, why}}
      error -> error
    end
  end

  @doc "Recomputes every chain of every shard, one shard at a time (`Kuma.verify_store/2`)."
  @spec verify_store(Store.t(), (non_neg_integer(), pos_integer(), map() -> term())) ::
          {:ok, map()} | {:error, term()}
  def verify_store(%Store{} = s, progress) do
    summary = %{shards: s.shards, entities: 0, events: 0}

    Enum.reduce_while(0..(s.shards - 1), {:ok, summary, []}, fn shard, {:ok, acc, problems} ->
      case Native.read_verify_shard(s.native, shard, 100) do
        {:ok, report} ->
          progress.(shard, s.shards, report)
          found = Enum.map(report.problems, &Map.put(&1, :shard, shard))
          acc = %{acc | entities: acc.entities + report.entities, events: acc.events + report.events}
          {:cont, {:ok, acc, problems ++ found}}

        {:error, reason} ->
          {:halt, {:error, reason}}
      end
    end)
    |> case do
      {:ok, summary, []} -> {:ok, summary}
      {:ok, _summary, problems} -> {:error, {:tampered, problems}}
      error -> error
    end
  end
end
