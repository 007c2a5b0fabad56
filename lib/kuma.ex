defmodule Kuma do
  @moduledoc """
  Kuma: an entity-native event store for the BEAM.

  Events are appended per entity into SQLite shards through a Rust core: each shard has one
  writer thread that commits whatever is queued in one transaction (group commit). Every
  entity's events form a BLAKE3 hash chain that `verify/2` recomputes.

      {:ok, store} = Kuma.start(name: :bank, data_dir: "data", shards: 16)
      {:ok, 2} = Kuma.append(store, "alice", [{:opened, %{}}, {:credited, %{amount: 50}}])
      {:ok, 3} = Kuma.append(store, "alice", {:debited, %{amount: 20}}, expected_seq: 2)
      {:error, {:wrong_expected_seq, 2, 3}} = Kuma.append(store, "alice", {:debited, %{}}, expected_seq: 2)
      [%Kuma.Envelope{seq: 1, type: "opened"} | _] = Kuma.stream(store, "alice") |> Enum.to_list()
      {:ok, %{events: 3}} = Kuma.verify(store, "alice")
      :ok = Kuma.stop(store)

  ## Errors

  Functions return `{:error, reason}` for bad input and failures and change nothing then.
  `format_error/1` turns any reason into a sentence. The reasons:

  * `{:invalid, what, why}` - bad argument (`what`: `:entity_id`, `:events`, `:metadata`,
    `:event_type`, `:expected_seq`, `:data_dir`, `:shards`, `:sync`, `:name`, `:store`, ...)
  * `{:too_large, what, size, max}` - a documented size limit was exceeded (see below)
  * `{:unknown_option, key}` - a misspelled or unsupported option
  * `{:wrong_expected_seq, expected, actual}` - optimistic concurrency conflict
  * `:store_closed`, `{:no_store, name}` - the store was stopped / never started
  * `{:already_started, name}` - a store with this name is running
  * `{:data_dir_locked, path}` - another store (this VM or another OS process) has the data dir open
  * `{:shard_count_mismatch, stored, requested}` - the data dir was created with another shard count
  * `{:foreign_file, path, why}` - a file where a shard should be is not a shard of this store
  * `{:missing_shard, path}` - a shard file is missing (Kuma never silently recreates one)
  * `{:unsupported_format, found, supported}` - written by a newer Kuma
  * `{:storage, context, message}` - SQLite or the file system failed
  * `{:corrupt, seq, why}` - stored data failed an integrity check while reading
  * `{:panic, message}` - a bug in Kuma's Rust code was caught; the VM is unaffected
  * `:timeout` - no answer within `:timeout`; the append may still commit
  * `:entity_erased` - the entity was erased (`delete/3`): it cannot be written or read
  * `{:subject_erased, id}` - a `Kuma.Sensitive` value names an erased subject
  * `:wrong_master_key`, `{:missing_master_key, why}`, `{:missing_keystore, path}`,
    `{:encryption_mismatch, :store_is_encrypted | :store_is_plain}` - see "Encryption" in `start/1`
  * `{:decrypt_failed, seq, why}` - a stored ciphertext did not decrypt (altered, or copied
    from another entity or position); never returned as garbage data
  * `{:forget_unconfirmed, pids}` - `delete/3` erased the data but some listeners did not confirm
  * `{:unknown_projection, name}` - no projection or read model of that name is running
  * `{:sql, index | nil, message}` - a read model's SQL failed (nothing of it was kept)
  * `{:invalid_schema, module, reason}`, `{:foreign_projection, path, why}` - a read model
    could not start

  ## Limits

  Entity ids: non-empty binaries of at most 512 bytes. Per event: type at most 255 bytes,
  encoded payload at most 8 MiB, encoded metadata at most 64 KiB. Per append: at most
  100,000 events and 64 MiB.
  """

  alias Kuma.{Codec, Native, Store}

  @default_timeout 30_000
  # Above these, an append is decoded on a dirty CPU scheduler: decoding and copying cost
  # ~0.25 µs per event and ~1 µs per 4 KiB on this machine (docs/benchmarks.md, "NIF call
  # cost"), so these keep a normal scheduler near 20 µs (p50) and under 100 µs (p99).
  @dirty_events 100
  @dirty_bytes 64 * 1024

  @type store :: Store.t() | Store.name()
  @type entity_id :: binary()
  @type reason :: term()

  # -- lifecycle ------------------------------------------------------------------------

  @doc """
  Starts a store under Kuma's own supervisor and returns it.

  Options:
  * `:data_dir` (required) - directory of the store; created if missing
  * `:name` - an atom naming the store (default `:kuma`); two stores need two names
  * `:shards` - number of shard files, 1..1024 (default 16); fixed at creation
  * `:writer_threads` - OS threads writing the shards; default `nil` = one per shard.
    Fewer threads switch less but get a smaller share of the CPU next to the BEAM's
    schedulers; see docs/benchmarks.md before changing it
  * `:aggregates` - the `Kuma.Aggregate` modules whose entities this store hosts
  * `:snapshot_every` - an entity writes a snapshot every N events (default 100; `nil` = never)
  * `:idle_timeout` - ms after which an unused live entity is passivated (default 15 minutes;
    `:infinity` = never)
  * `:max_live_entities` - when more are live, the least recently used are passivated
    (default 100,000; `:infinity` = no limit)
  * `:upcasters` - `Kuma.Upcaster` modules or 2-arity functions applied to every event read
  * `:decode` - `:trusted` (default) or `:safe`: whether reading may create atoms an event
    uses that this VM does not know yet (see `Kuma.Codec`)
  * `:sync` - `:normal` (default) or `:full`:
    - `:normal`: an acknowledged append survives a crash of the VM or `kill -9` (it is in
      the OS page cache); after power loss or an OS crash the last acknowledged appends may
      be missing, but the store is never corrupt.
    - `:full`: the write-ahead log is fsynced before an append is acknowledged, so an
      acknowledged append also survives power loss.

  Opening an existing directory with a different `:shards` fails with
  `{:shard_count_mismatch, stored, requested}`.

  ## Encryption

  On by default: every payload, metadata and snapshot is sealed with XChaCha20-Poly1305
  under the entity's own data key; data keys live in a keystore file, wrapped by a master
  key that Kuma never writes anywhere. Options:

  * `:master_key` - the 32-byte master key (raw, 64 hex characters or base64)
  * `:master_key_file` - a file holding it (hex or base64); keep it outside the data dir
  * `:master_key_env` - environment variable read when neither is given
    (default `"KUMA_MASTER_KEY"`)
  * `:keystore_path` - the keystore file (default `<data_dir>/keystore.kuma`)
  * `:encryption` - `false` creates an unencrypted store (no erasure from backups, no
    `Kuma.Sensitive`); the choice is recorded in the data dir and cannot change later

  Errors: `{:missing_master_key, why}`, `:wrong_master_key` (nothing is changed),
  `{:missing_keystore, path}`, `{:encryption_mismatch, ...}`.
  """
  @spec start(keyword()) :: {:ok, Store.t()} | {:error, reason()}
  def start(opts) do
    with {:ok, config} <- Store.Config.validate(opts) do
      spec = %{
        id: {Kuma, config.name},
        start: {Store.Supervisor, :start_link, [config]},
        type: :supervisor,
        restart: :transient
      }

      case DynamicSupervisor.start_child(Kuma.Stores, spec) do
        {:ok, _pid} -> Store.lookup(config.name)
        {:error, reason} -> {:error, start_error(reason, config.name)}
      end
    end
  end

  @doc """
  Starts a store linked to the caller; see `start/1` for options. Use it through
  `{Kuma, opts}` in your supervision tree and address the store by its `:name`.
  """
  @spec start_link(keyword()) :: Supervisor.on_start()
  def start_link(opts) do
    with {:ok, config} <- Store.Config.validate(opts) do
      case Store.Supervisor.start_link(config) do
        {:ok, pid} -> {:ok, pid}
        {:error, reason} -> {:error, start_error(reason, config.name)}
      end
    end
  end

  @doc "A child spec for `{Kuma, opts}`: the store restarts if it crashes, not after `stop/1`."
  @spec child_spec(keyword()) :: Supervisor.child_spec()
  def child_spec(opts) do
    %{
      id: {Kuma, Keyword.get(opts, :name, :kuma)},
      start: {Kuma, :start_link, [opts]},
      type: :supervisor,
      restart: :transient
    }
  end

  defp start_error({:already_started, _pid}, name), do: {:already_started, name}
  defp start_error({:shutdown, {:failed_to_start_child, _child, reason}}, name), do: start_error(reason, name)
  defp start_error({:shutdown, reason}, name), do: start_error(reason, name)
  defp start_error(reason, _name), do: reason

  @doc """
  Stops a store: every queued append is committed, entity heads are checkpointed, files are
  closed and the data directory is unlocked. Returns `{:error, {:no_store, name}}` if it is
  not running.
  """
  @spec stop(store()) :: :ok | {:error, reason()}
  def stop(store) do
    name =
      case store do
        %Store{name: name} -> name
        name -> name
      end

    case is_atom(name) && Store.whereis(name, :supervisor) do
      pid when is_pid(pid) ->
        # Stop as the parent would: :normal is not restarted (restart: :transient).
        case DynamicSupervisor.terminate_child(Kuma.Stores, pid) do
          :ok -> :ok
          {:error, :not_found} -> Supervisor.stop(pid, :normal)
        end

      _ ->
        {:error, {:no_store, name}}
    end
  catch
    :exit, _ -> {:error, {:no_store, store}}
  end

  # -- writing --------------------------------------------------------------------------

  @doc """
  Appends events to one entity, atomically: all of them or none.

  `events` is a list of terms, or a single term that is not a list. Returns the entity's
  new last sequence number once the events are committed (see `start/1` for what `:sync`
  promises).

  Options:
  * `:expected_seq` - the entity's current last seq (0 for a new entity); if it differs,
    nothing is written and `{:error, {:wrong_expected_seq, expected, actual}}` is returned
  * `:metadata` - a map stored with every event of this append
  * `:timeout` - milliseconds to wait for the commit (default 30,000); on `{:error, :timeout}`
    the append may still commit later
  * `:return` - `:seq` (default) or `:token`: then the result is `{:ok, last_seq, token}`,
    where `token` is the `Kuma.Position` of the events written, for
    `Kuma.Projection.wait_for/3` (read-your-writes)

  A `:scope` in the metadata makes the events findable by scope (`query/2`, projection and
  subscription filters); see `Kuma.Codec`.
  """
  @spec append(store() | Kuma.Entity.t(), entity_id() | term(), term(), keyword()) ::
          {:ok, pos_integer()} | {:ok, pos_integer(), Kuma.Position.t()} | {:error, reason()}
  def append(store_or_entity, entity_id_or_events, events_or_opts \\ [], opts \\ [])

  def append(%Kuma.Entity{} = entity, events, opts, []) when is_list(opts), do: Kuma.Entity.append(entity, events, opts)

  def append(store, entity_id, events, opts) do
    with {:ok, s} <- Store.lookup(store),
         :ok <- check_options(opts, [:expected_seq, :metadata, :timeout, :return]),
         :ok <- check_return(opts),
         :ok <- check_entity_id(entity_id) do
      events = List.wrap(events)

      case Kuma.Entity.whereis(s, entity_id) do
        nil -> direct_last_seq(s, entity_id, events, opts)
        pid -> append_via(pid, s, entity_id, events, opts)
      end
    end
  end

  defp direct_last_seq(s, entity_id, events, opts) do
    case append_direct(s, entity_id, events, opts) do
      {:ok, details} -> appended(s, entity_id, details, opts)
      error -> error
    end
  end

  @doc false
  # The answer to an append: {:ok, last_seq}, or with return: :token also its position.
  @spec appended(Store.t(), entity_id(), tuple(), keyword()) ::
          {:ok, pos_integer()} | {:ok, pos_integer(), Kuma.Position.t()}
  def appended(s, entity_id, {_first, last, _first_pos, last_pos, _ts, _hash}, opts) do
    case Keyword.get(opts, :return, :seq) do
      :token -> {:ok, last, %{Native.shard_for(entity_id, s.shards) => last_pos}}
      :seq -> {:ok, last}
    end
  end

  @doc false
  def check_return(opts) do
    if Keyword.get(opts, :return, :seq) in [:seq, :token],
      do: :ok,
      else: {:error, {:invalid, :return, "must be :seq or :token"}}
  end

  # A live entity is the only writer of its stream: let it append (and fold) the events.
  # If it stops meanwhile, it is no longer live and storage can be written directly.
  defp append_via(pid, s, entity_id, events, opts) do
    GenServer.call(pid, {:append, :any, events, opts}, Keyword.get(opts, :timeout, @default_timeout))
  catch
    :exit, {:timeout, _} -> {:error, :timeout}
    :exit, _ -> direct_last_seq(s, entity_id, events, opts)
  end

  @doc false
  # Writes to storage without looking for a live entity (used by the entity itself and for
  # cold entities). Returns {first_seq, last_seq, first_pos, last_pos, timestamp_us, last_hash}.
  @spec append_direct(Store.t(), entity_id(), [term()], keyword()) :: {:ok, tuple()} | {:error, reason()}
  def append_direct(%Store{} = s, entity_id, events, opts) do
    with {:ok, expected} <- expected_seq(Keyword.get(opts, :expected_seq)),
         {:ok, encoded, bytes} <- Codec.encode_events(events, Keyword.get(opts, :metadata), s) do
      ref = make_ref()

      queued =
        if length(encoded) > @dirty_events or bytes > @dirty_bytes,
          do: Native.append_dirty(s.native, ref, entity_id, expected, encoded),
          else: Native.append(s.native, ref, entity_id, expected, encoded)

      case queued do
        {:ok, :ok} -> await(ref, Keyword.get(opts, :timeout, @default_timeout))
        {:error, reason} -> {:error, reason}
      end
    end
  end

  @doc """
  Appends to many entities in few calls (bulk ingest).

  `entries` is a list of `{entity_id, events}` or `{entity_id, events, opts}` where opts may
  hold `:expected_seq` and `:metadata`. Every entry is validated first: if one is invalid,
  nothing is written. Each entry is then atomic on its own; entries for different shards
  commit independently.

  Returns `{:ok, last_seqs}` (one per entry, in order) when every entry was written, or
  `{:error, {:partial, results}}` with `{:ok, last_seq} | {:error, reason}` per entry when
  some were refused (for example a stale `:expected_seq`); the others are committed.

  Options: `:timeout` (default 30,000 ms).
  """
  @spec append_batch(store(), [{entity_id(), term()} | {entity_id(), term(), keyword()}], keyword()) ::
          {:ok, [pos_integer()]} | {:error, reason()}
  def append_batch(store, entries, opts \\ [])

  def append_batch(_store, [], _opts), do: {:error, {:invalid, :entries, "must not be empty"}}

  def append_batch(store, entries, opts) when is_list(entries) do
    with {:ok, s} <- Store.lookup(store),
         :ok <- check_options(opts, [:timeout]),
         {:ok, encoded} <- encode_entries(s, entries) do
      timeout = Keyword.get(opts, :timeout, @default_timeout)
      # Entries of live entities go through their process (the single writer); the rest
      # go to storage in one NIF call.
      {live, cold} =
        entries
        |> Enum.zip(encoded)
        |> Enum.with_index()
        |> Enum.split_with(fn {{_raw, {{id, _, _}, _, _}}, _i} -> Kuma.Entity.whereis(s, id) != nil end)

      with {:ok, cold_results} <- append_cold(s, cold, timeout) do
        live_results =
          Enum.map(live, fn {{raw, {{id, _, _}, _, _}}, i} ->
            {events, entry_opts} = raw_entry(raw)
            {i, append(s, id, events, Keyword.put(entry_opts, :timeout, timeout))}
          end)

        (cold_results ++ live_results)
        |> Enum.sort_by(&elem(&1, 0))
        |> Enum.map(&elem(&1, 1))
        |> batch_result()
      end
    end
  end

  def append_batch(_store, _entries, _opts), do: {:error, {:invalid, :entries, "must be a list"}}

  defp raw_entry({_id, events}), do: {List.wrap(events), []}
  defp raw_entry({_id, events, opts}), do: {List.wrap(events), opts}

  defp append_cold(_s, [], _timeout), do: {:ok, []}

  defp append_cold(s, cold, timeout) do
    sized = Enum.map(cold, fn {{_raw, sized}, _i} -> sized end)
    encoded = Enum.map(sized, &elem(&1, 0))
    events = sized |> Enum.map(&elem(&1, 1)) |> Enum.sum()
    bytes = sized |> Enum.map(&elem(&1, 2)) |> Enum.sum()
    ref = make_ref()

    queued =
      if events > @dirty_events or bytes > @dirty_bytes,
        do: Native.append_batch_dirty(s.native, ref, encoded),
        else: Native.append_batch(s.native, ref, encoded)

    with {:ok, :ok} <- queued do
      case await(ref, timeout) do
        results when is_list(results) ->
          indexes = Enum.map(cold, &elem(&1, 1))
          {:ok, Enum.zip(indexes, Enum.map(results, &last_seq/1))}

        {:error, reason} ->
          {:error, reason}
      end
    end
  end

  defp last_seq({:ok, details}), do: {:ok, elem(details, 1)}
  defp last_seq(error), do: error

  # Validates and encodes every entry: [{{id, expected, encoded_events}, event_count, bytes}].
  defp encode_entries(s, entries) do
    Enum.reduce_while(entries, {:ok, []}, fn entry, {:ok, acc} ->
      case encode_entry(s, entry) do
        {:ok, encoded, count, size} -> {:cont, {:ok, [{encoded, count, size} | acc]}}
        {:error, _} = error -> {:halt, error}
      end
    end)
    |> case do
      {:ok, acc} -> {:ok, Enum.reverse(acc)}
      error -> error
    end
  end

  defp encode_entry(s, {id, events}), do: encode_entry(s, {id, events, []})

  defp encode_entry(s, {id, events, opts}) when is_list(opts) do
    events = if is_list(events), do: events, else: [events]

    with :ok <- check_options(opts, [:expected_seq, :metadata]),
         :ok <- check_entity_id(id),
         {:ok, expected} <- expected_seq(Keyword.get(opts, :expected_seq)),
         {:ok, encoded, bytes} <- Codec.encode_events(events, Keyword.get(opts, :metadata), s) do
      {:ok, {id, expected, encoded}, length(encoded), bytes}
    end
  end

  defp encode_entry(_s, other),
    do:
      {:error,
       {:invalid, :entries, "expected {entity_id, events} or {entity_id, events, opts}, got: #{inspect(other)}"}}

  defp batch_result(results) do
    if Enum.all?(results, &match?({:ok, _}, &1)),
      do: {:ok, Enum.map(results, fn {:ok, seq} -> seq end)},
      else: {:error, {:partial, results}}
  end

  @doc false
  # The writer thread's answer to a queued request (`{:kuma_reply, ref, result}`).
  @spec await(reference(), timeout()) :: term()
  def await(ref, timeout) do
    receive do
      {:kuma_reply, ^ref, result} -> result
    after
      timeout -> {:error, :timeout}
    end
  end

  @doc "Waits until every append queued before this call is committed, and checkpoints entity heads."
  @spec flush(store()) :: :ok | {:error, reason()}
  def flush(store) do
    with {:ok, s} <- Store.lookup(store), {:ok, :ok} <- Native.flush(s.native), do: :ok
  end

  # -- entities -------------------------------------------------------------------------

  @doc """
  A handle to the entity `id` of `aggregate` (see `Kuma.Aggregate`); starts nothing.
  Without an aggregate (`entity/2`), the entity's state is its latest event
  (`Kuma.Aggregate.Latest`). See `Kuma.Entity` for how entities live and are passivated.
  """
  @spec entity(store(), module(), entity_id()) :: Kuma.Entity.t()
  def entity(store, aggregate \\ Kuma.Aggregate.Latest, id)
  def entity(store, aggregate, id), do: Kuma.Entity.new(store, aggregate, id)

  @doc """
  Decides `command` with the aggregate's `handle/2` against the entity's current state,
  appends the resulting events and folds them into the state, in the entity's process.

  Returns `{:ok, seq}` (the entity's seq after the command; unchanged if the command
  produced no events) or `{:error, reason}`; on error nothing was written. Reasons include
  the aggregate's own (`{:error, :insufficient_funds}`), `{:no_handle, aggregate}`,
  `{:unknown_aggregate, module}`, `{:aggregate_mismatch, live_aggregate}`,
  `{:wrong_expected_seq, expected, actual}` (with `expected_seq:`),
  `{:user_code_crashed, :handle | :apply, message}` and the storage errors of `append/4`.

  Options: `:expected_seq`, `:metadata`, `:timeout` (default 30,000 ms).
  """
  @spec execute(Kuma.Entity.t(), term(), keyword()) ::
          {:ok, non_neg_integer()} | {:ok, non_neg_integer(), Kuma.Position.t()} | {:error, reason()}
  defdelegate execute(entity, command, opts \\ []), to: Kuma.Entity

  @doc "The entity's current state, served from memory; raises `Kuma.Error` if it cannot be loaded."
  @spec read(Kuma.Entity.t()) :: term()
  defdelegate read(entity), to: Kuma.Entity

  @doc "Like `read/1` but returns `{:ok, state}` or `{:error, reason}`."
  @spec fetch(Kuma.Entity.t()) :: {:ok, term()} | {:error, reason()}
  defdelegate fetch(entity), to: Kuma.Entity

  @doc """
  Time travel: the entity's state after event `seq: n`, or as of `at: %DateTime{}`,
  rebuilt from storage with the aggregate (snapshots are used where they help).
  """
  @spec read_at(Kuma.Entity.t(), keyword()) :: {:ok, term()} | {:error, reason()}
  defdelegate read_at(entity, opts), to: Kuma.Entity

  @doc """
  The entity's events (`Kuma.Envelope`s with seq, type, timestamp, metadata, hash), their
  data upcast by the store's and the aggregate's upcasters. Options: `:from`, `:limit`.
  """
  @spec history(Kuma.Entity.t(), keyword()) :: {:ok, [Kuma.Envelope.t()]} | {:error, reason()}
  defdelegate history(entity, opts \\ []), to: Kuma.Entity

  @doc "Stops the entity's process now (it reloads on next use)."
  @spec passivate(Kuma.Entity.t()) :: :ok | {:error, reason()}
  defdelegate passivate(entity), to: Kuma.Entity

  @doc """
  `{:ok, %{live: false}}` or `{:ok, %{live: true, seq: n, snapshot_seq: s, replayed_on_load: r, ...}}`:
  whether the entity is live, and how its last load went (from which snapshot, how many
  events were replayed).
  """
  @spec entity_info(Kuma.Entity.t()) :: {:ok, map()} | {:error, reason()}
  defdelegate entity_info(entity), to: Kuma.Entity, as: :info

  # -- reading --------------------------------------------------------------------------

  @doc """
  A lazy stream of an entity's events (`Kuma.Envelope`s), in seq order, read from disk in
  chunks on a dirty IO scheduler. An unknown entity gives an empty stream.

  Options: `:from` - first seq (default 1); `:chunk` - events per read (default 500).

  Raises `ArgumentError` for a non-binary or empty id. Enumerating raises `Kuma.Error` if
  the store is closed or a read fails, and `Kuma.DecodeError` if an event cannot be decoded.
  """
  @spec stream(store(), entity_id(), keyword()) :: Enumerable.t()
  def stream(store, entity_id, opts \\ []) do
    if not (is_binary(entity_id) and entity_id != ""),
      do: raise(ArgumentError, "entity id must be a non-empty binary, got: #{inspect(entity_id)}")

    from = Keyword.get(opts, :from, 1)
    chunk = Keyword.get(opts, :chunk, 500)

    if not (is_integer(from) and from >= 1), do: raise(ArgumentError, ":from must be a positive integer")
    if not (is_integer(chunk) and chunk >= 1), do: raise(ArgumentError, ":chunk must be a positive integer")

    Stream.resource(
      fn -> from end,
      fn
        :done ->
          {:halt, :done}

        seq ->
          case read_chunk(store, entity_id, seq, chunk) do
            {:ok, []} -> {:halt, :done}
            {:ok, events} when length(events) < chunk -> {events, :done}
            {:ok, events} -> {events, List.last(events).seq + 1}
            {:error, reason} -> raise Kuma.Error, reason: reason
          end
      end,
      fn _ -> :ok end
    )
  end

  @doc """
  Reads up to `:limit` events of an entity (default: all) from `:from` (default 1).
  Like `stream/3` but returns `{:ok, [Kuma.Envelope.t()]}` or `{:error, reason}`.
  """
  @spec events(store(), entity_id(), keyword()) :: {:ok, [Kuma.Envelope.t()]} | {:error, reason()}
  def events(store, entity_id, opts \\ []) do
    with :ok <- check_options(opts, [:from, :limit]),
         :ok <- check_entity_id(entity_id) do
      from = Keyword.get(opts, :from, 1)
      limit = Keyword.get(opts, :limit, :infinity)
      collect(store, entity_id, from, limit, [])
    end
  end

  defp collect(_store, _id, _from, 0, acc), do: {:ok, acc |> Enum.reverse() |> List.flatten()}

  defp collect(store, id, from, limit, acc) do
    chunk = if limit == :infinity, do: 1000, else: min(limit, 1000)

    case read_chunk(store, id, from, chunk) do
      {:ok, []} ->
        collect(store, id, from, 0, acc)

      {:ok, events} ->
        left = if limit == :infinity, do: :infinity, else: limit - length(events)
        left = if length(events) < chunk, do: 0, else: left
        collect(store, id, List.last(events).seq + 1, left, [events | acc])

      error ->
        error
    end
  end

  defp read_chunk(store, entity_id, from, max) do
    with {:ok, s} <- Store.lookup(store),
         {:ok, tuples} <- Native.read_entity(s.native, entity_id, from, max) do
      shard = Native.shard_for(entity_id, s.shards)
      {:ok, Enum.map(tuples, &Codec.envelope(&1, shard, s))}
    end
  end

  @doc """
  Events of one shard with position greater than `after`, in commit order (up to `limit`).
  The building block for projections and subscriptions: positions only grow, and an event
  becomes readable only after every event with a lower position of its shard.
  """
  @spec read_shard(store(), non_neg_integer(), non_neg_integer(), pos_integer()) ::
          {:ok, [Kuma.Envelope.t()]} | {:error, reason()}
  def read_shard(store, shard, after_position, limit \\ 1000) do
    with {:ok, s} <- Store.lookup(store),
         :ok <- check_non_neg(:shard, shard),
         :ok <- check_non_neg(:after, after_position),
         :ok <- check_non_neg(:limit, limit),
         {:ok, tuples} <- Native.read_shard(s.native, shard, after_position, limit) do
      {:ok, Enum.map(tuples, &Codec.envelope(&1, shard, s))}
    end
  end

  # -- across entities --------------------------------------------------------------------

  @doc """
  The store's position now: the last committed position of every shard, a
  `Kuma.Position` covering every append acknowledged so far. Pass it to
  `Kuma.Projection.wait_for/3` to wait until a projection has caught up with everything
  written before this call, or as `:from` to `subscribe/2`.
  """
  @spec position(store()) :: {:ok, Kuma.Position.t()} | {:error, reason()}
  def position(store) do
    with {:ok, s} <- Store.lookup(store), do: {:ok, Kuma.Feed.heads(s)}
  end

  @doc """
  Subscribes the caller to new events of the store: it receives `{:kuma_event, envelope}`
  for every matching event, in commit order within each shard, from a process that ends
  when the caller does (or on `unsubscribe/1`).

  Options (filters as in `Kuma.Projection`):
  * `:types` (or `:type`) - event types (strings, or struct modules)
  * `:entity_id` - one entity; `:id_prefix` - entities whose id starts with this
  * `:scope` - a scope, or a scope prefix ending in `*` (`"org:acme/*"`)
  * `:from` - `:now` (default: events committed after `subscribe` returns), `:start`
    (every stored event first), or a `Kuma.Position` to resume after
  * `:max_queue` - the most messages the subscriber's mailbox may hold (default 10,000)

  ## A slow subscriber

  Events are read from storage, not buffered in memory. When the subscriber's mailbox holds
  `:max_queue` messages or more, the subscription stops reading and sends
  `{:kuma_lagged, position}` once (the position delivered so far). It resumes on its own
  when the mailbox has room again, from where it stopped, so nothing is lost and memory
  stays bounded by `:max_queue` messages; `position` is also what to pass as `:from` to a
  new subscription after a restart.
  """
  @spec subscribe(store(), keyword()) :: {:ok, pid()} | {:error, reason()}
  def subscribe(store, opts \\ []) do
    with {:ok, s} <- Store.lookup(store),
         :ok <- check_options(opts, [:types, :type, :entity_id, :id_prefix, :scope, :from, :max_queue]),
         {:ok, filter} <- Kuma.Projection.filter(opts),
         {:ok, from} <- subscription_from(Keyword.get(opts, :from, :now)),
         max_queue = Keyword.get(opts, :max_queue, 10_000),
         :ok <- check_positive(:max_queue, max_queue) do
      spec = %{
        name: make_ref(),
        store: s.name,
        kind: :subscription,
        module: nil,
        args: nil,
        filter: filter,
        on_error: :park,
        max_retries: 0,
        retry_backoff: 100,
        batch_size: min(500, max_queue),
        checkpoint_mode: :memory,
        path: nil,
        restart: :temporary,
        subscriber: self(),
        from: from,
        max_queue: max_queue
      }

      DynamicSupervisor.start_child(Store.via(s.name, :projections), Kuma.Projection.Runner.child_spec(spec))
    end
  catch
    :exit, _ -> {:error, :store_closed}
  end

  defp subscription_from(:now), do: {:ok, :now}
  defp subscription_from(:start), do: {:ok, %{}}

  defp subscription_from(position) do
    if Kuma.Position.valid?(position),
      do: {:ok, position},
      else: {:error, {:invalid, :from, "must be :now, :start or a Kuma.Position"}}
  end

  defp check_positive(_key, n) when is_integer(n) and n > 0, do: :ok
  defp check_positive(key, _n), do: {:error, {:invalid, key, "must be a positive integer"}}

  @doc "Ends a subscription started with `subscribe/2`."
  @spec unsubscribe(pid()) :: :ok
  def unsubscribe(subscription) when is_pid(subscription) do
    GenServer.stop(subscription, :normal, 30_000)
  catch
    :exit, _ -> :ok
  end

  @doc """
  Events of many entities, found by type, scope, entity id prefix and time, across all
  shards. Returns `{:ok, envelopes}`: in position order within each shard, shards merged
  by timestamp.

  Options:
  * `:types` (or `:type`) - event types (strings, or struct modules)
  * `:scope` - a scope, or a prefix ending in `*`: `"org:acme/*"` matches `"org:acme/x"`
    and `"org:acme/x/y"`, not `"org:acmex"`
  * `:id_prefix` - entities whose id starts with this
  * `:from`, `:to` - timestamps (`DateTime` or µs since the epoch), both inclusive
  * `:after` - a `Kuma.Position`: only events after it (for paging, see below)
  * `:limit` - at most this many envelopes (default 100, at most 10,000)

  Types and scopes are served by indexes kept by the shards (docs/storage-format.md), so
  a selective query does not read the whole log; `:from`/`:to` and `:id_prefix` filter
  what those return. Next page:
  `after: Kuma.Position.merge(previous_after, Kuma.Position.of(envelopes))`.
  """
  @spec query(store(), keyword()) :: {:ok, [Kuma.Envelope.t()]} | {:error, reason()}
  def query(store, opts \\ []) do
    with {:ok, s} <- Store.lookup(store),
         :ok <- check_options(opts, [:types, :type, :scope, :id_prefix, :from, :to, :after, :limit]),
         {:ok, filter} <- Kuma.Projection.filter(opts),
         {:ok, from} <- timestamp(:from, Keyword.get(opts, :from)),
         {:ok, to} <- timestamp(:to, Keyword.get(opts, :to)),
         after_pos = Keyword.get(opts, :after, %{}),
         :ok <-
           if(Kuma.Position.valid?(after_pos), do: :ok, else: {:error, {:invalid, :after, "must be a Kuma.Position"}}),
         limit = Keyword.get(opts, :limit, 100),
         :ok <-
           if(is_integer(limit) and limit in 1..10_000, do: :ok, else: {:error, {:invalid, :limit, "must be 1..10000"}}),
         {:ok, per_shard} <- query_shards(s, filter, from, to, after_pos, limit) do
      {:ok, per_shard |> merge_by_time(limit, []) |> Enum.map(fn {shard, tuple} -> Codec.envelope(tuple, shard, s) end)}
    end
  end

  defp timestamp(_key, nil), do: {:ok, nil}
  defp timestamp(_key, %DateTime{} = t), do: {:ok, DateTime.to_unix(t, :microsecond)}
  defp timestamp(_key, us) when is_integer(us), do: {:ok, us}
  defp timestamp(key, _other), do: {:error, {:invalid, key, "must be a DateTime or microseconds since the epoch"}}

  defp query_shards(s, filter, from, to, after_pos, limit) do
    Enum.reduce_while((s.shards - 1)..0//-1, {:ok, []}, fn shard, {:ok, acc} ->
      query = {Map.get(after_pos, shard, 0), filter.types, filter.scope, filter.id_prefix, from, to}

      case Native.query_shard(s.native, shard, query, limit) do
        {:ok, {[], _}} -> {:cont, {:ok, acc}}
        {:ok, {events, _searched}} -> {:cont, {:ok, [{shard, events} | acc]}}
        {:error, reason} -> {:halt, {:error, reason}}
      end
    end)
  end

  # k-way merge of per-shard lists (each in position order) by {timestamp, shard}: taking
  # only from list heads keeps what is taken of each shard a prefix, so paging with :after
  # neither skips nor repeats.
  defp merge_by_time(_lists, 0, acc), do: Enum.reverse(acc)
  defp merge_by_time([], _left, acc), do: Enum.reverse(acc)

  defp merge_by_time(lists, left, acc) do
    {shard, [first | rest]} = Enum.min_by(lists, fn {shard, [event | _]} -> {elem(event, 3), shard} end)
    lists = if rest == [], do: List.keydelete(lists, shard, 0), else: List.keyreplace(lists, shard, 0, {shard, rest})
    merge_by_time(lists, left - 1, [{shard, first} | acc])
  end

  @doc """
  The head of an entity: its last seq, position, timestamp and chain hash, or `nil` if it
  has no events. Recording the head somewhere else lets you later prove that no event was
  removed from the end of the stream.
  """
  @spec head(store(), entity_id()) ::
          {:ok, nil | %{seq: pos_integer(), position: pos_integer(), timestamp: integer(), hash: binary()}}
          | {:error, reason()}
  def head(store, entity_id) do
    with {:ok, s} <- Store.lookup(store),
         :ok <- check_entity_id(entity_id),
         {:ok, head} <- Native.head(s.native, entity_id) do
      case head do
        nil -> {:ok, nil}
        {seq, pos, ts, hash} -> {:ok, %{seq: seq, position: pos, timestamp: ts, hash: hash}}
      end
    end
  end

  @doc "The shard that stores `entity_id` (see docs/storage-format.md for the function)."
  @spec shard_for(store(), entity_id()) :: {:ok, non_neg_integer()} | {:error, reason()}
  def shard_for(store, entity_id) do
    with {:ok, s} <- Store.lookup(store), :ok <- check_entity_id(entity_id) do
      {:ok, Native.shard_for(entity_id, s.shards)}
    end
  end

  # -- data protection ------------------------------------------------------------------

  @doc """
  Erases an entity (GDPR Art. 17): stops its process, deletes its events and snapshots,
  destroys its data key, tells forget listeners (read models) to drop it, and leaves no
  readable trace in the files or in old backups. See `Kuma.Erasure` for the exact steps.

  Accepts an entity handle (`Kuma.delete(entity)`) or a store and an id. Returns
  `{:ok, %{events_deleted: n}}`. Afterwards appends to the id return
  `{:error, :entity_erased}`. Idempotent.

  Options: `:timeout` (ms for the storage erasure, default 60,000), `:forget_timeout` (ms to
  wait for listeners, default 5,000).
  """
  @spec delete(store() | Kuma.Entity.t(), entity_id() | keyword(), keyword()) ::
          {:ok, %{events_deleted: non_neg_integer()}} | {:error, reason()}
  def delete(store_or_entity, entity_id_or_opts \\ [], opts \\ [])

  def delete(%Kuma.Entity{store: store, id: id}, opts, []) when is_list(opts), do: delete(store, id, opts)

  def delete(store, entity_id, opts) do
    with {:ok, s} <- Store.lookup(store),
         :ok <- check_options(opts, [:timeout, :forget_timeout]),
         :ok <- check_entity_id(entity_id) do
      Kuma.Erasure.delete(s, entity_id, opts)
    end
  end

  @doc """
  Whether `entity_id` was erased with `delete/3`.
  """
  @spec erased?(store(), entity_id()) :: {:ok, boolean()} | {:error, reason()}
  def erased?(store, entity_id) do
    with {:ok, s} <- Store.lookup(store), :ok <- check_entity_id(entity_id) do
      Native.is_erased(s.native, entity_id)
    end
  end

  @doc """
  Everything stored about an entity, decrypted (GDPR Art. 20): every event with seq,
  position, type, timestamp, metadata, data and chain hash, every snapshot, and whether the
  chain verified. See `Kuma.Export` for the shape. Accepts an entity handle (events are then
  upcast by the store's and the aggregate's upcasters, as on every read path) or a store and
  an id (the store's upcasters). `{:error, :entity_erased}` after `delete/3`.
  """
  @spec export(store() | Kuma.Entity.t(), entity_id() | nil) :: {:ok, map()} | {:error, reason()}
  def export(store_or_entity, entity_id \\ nil)
  def export(%Kuma.Entity{store: store, id: id, aggregate: aggregate}, nil), do: export(store, id, aggregate)
  def export(store, entity_id), do: export(store, entity_id, nil)

  defp export(store, entity_id, aggregate) do
    with {:ok, s} <- Store.lookup(store), :ok <- check_entity_id(entity_id) do
      Kuma.Export.export(s, entity_id, aggregate)
    end
  end

  @doc """
  `export/2` rendered as one JSON document (format `"kuma-export-v1"`, documented in
  `Kuma.Export`): `{:ok, json_string}`.
  """
  @spec export_json(store() | Kuma.Entity.t(), entity_id() | nil) :: {:ok, String.t()} | {:error, reason()}
  def export_json(store_or_entity, entity_id \\ nil) do
    with {:ok, export} <- export(store_or_entity, entity_id), do: {:ok, Kuma.Export.to_json(export)}
  end

  @doc """
  Wraps a value that is personal data of `subject` (an entity id) so that it is encrypted
  under the subject's key wherever it is stored, and reads back as a placeholder once the
  subject is erased. Option `:placeholder` (default `:erased`). See `Kuma.Sensitive`.
  """
  @spec sensitive(entity_id(), term(), keyword()) :: Kuma.Sensitive.t()
  defdelegate sensitive(subject, value, opts \\ []), to: Kuma.Sensitive, as: :new

  @doc """
  Rewraps every entity's data key with `new_key` (32 raw bytes, 64 hex characters or
  base64) in one keystore transaction; events are not touched. A crash midway leaves every
  key wrapped by the old master key; after `{:ok, %{keys: n}}` only the new one opens the
  store. Store the new key where the store reads it from (option, file or environment
  variable) before the next start; keep the old one until then.
  """
  @spec rotate_master_key(store(), binary()) :: {:ok, %{keys: non_neg_integer()}} | {:error, reason()}
  def rotate_master_key(store, new_key) do
    with {:ok, s} <- Store.lookup(store) do
      case Store.Config.parse_key(new_key) do
        {:ok, key} ->
          with {:ok, n} <- Native.rotate_master_key(s.native, key), do: {:ok, %{keys: n}}

        :error ->
          {:error, {:invalid, :master_key, "a key must be 32 raw bytes, 64 hex characters or base64"}}
      end
    end
  end

  # -- integrity ------------------------------------------------------------------------

  @doc """
  Recomputes an entity's hash chain from its first event to its head.

  Returns `{:ok, %{events: n, hash: head_hash}}`, or `{:error, {:tampered, seq, why}}`
  naming the first event that is missing, out of place or altered.
  """
  @spec verify(store(), entity_id()) :: {:ok, %{events: non_neg_integer(), hash: binary()}} | {:error, reason()}
  def verify(store, entity_id) do
    with {:ok, s} <- Store.lookup(store),
         :ok <- check_entity_id(entity_id) do
      case Native.verify_entity(s.native, entity_id) do
        {:ok, {:intact, n, hash}} -> {:ok, %{events: n, hash: hash}}
        {:ok, {:broken, seq, why}} -> {:error, {:tampered, seq, why}}
        error -> error
      end
    end
  end

  @doc """
  Verifies every chain of every shard (a full scan; it runs on dirty IO schedulers, one
  shard at a time). `:on_progress` is called as `fun.(shard, shards, shard_report)` after
  each shard.

  Returns `{:ok, %{shards: n, entities: e, events: v}}` or
  `{:error, {:tampered, problems}}` where each problem is
  `%{shard: s, entity_id: id, seq: seq, why: text}` (the first bad seq of each entity).
  """
  @spec verify_store(store(), keyword()) :: {:ok, map()} | {:error, reason()}
  def verify_store(store, opts \\ []) do
    progress = Keyword.get(opts, :on_progress, fn _, _, _ -> :ok end)

    with {:ok, s} <- Store.lookup(store) do
      Enum.reduce_while(0..(s.shards - 1), {:ok, %{shards: s.shards, entities: 0, events: 0}, []}, fn shard,
                                                                                                      {:ok, acc,
                                                                                                       problems} ->
        case Native.verify_shard(s.native, shard, 100) do
          {:ok, report} ->
            progress.(shard, s.shards, report)

            found =
              Enum.map(report.problems, fn {id, seq, why} -> %{shard: shard, entity_id: id, seq: seq, why: why} end)

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

  @doc "Facts about a running store: id, shards, data dir, sync mode, encryption and per-shard writer counters."
  @spec info(store()) :: {:ok, map()} | {:error, reason()}
  def info(store) do
    with {:ok, s} <- Store.lookup(store) do
      {:ok,
       %{
         name: s.name,
         store_id: s.store_id,
         data_dir: s.data_dir,
         shards: s.shards,
         sync: s.sync,
         encrypted: s.encrypted,
         writers: Native.stats(s.native)
       }}
    end
  end

  # -- errors ---------------------------------------------------------------------------

  @doc "A human-readable sentence for any error reason Kuma returns."
  @spec format_error(reason()) :: String.t()
  def format_error({:invalid, what, why}), do: "invalid #{what}: #{why}"
  def format_error({:too_large, what, size, max}), do: "#{what} too large: #{size} bytes or items, limit #{max}"
  def format_error({:unknown_option, key}), do: "unknown option #{inspect(key)}"

  def format_error({:wrong_expected_seq, expected, actual}),
    do: "expected the entity to be at seq #{expected}, but it is at #{actual}; nothing was written"

  def format_error(:store_closed), do: "the store has been stopped"
  def format_error({:no_store, name}), do: "no store named #{inspect(name)} is running"
  def format_error({:already_started, name}), do: "a store named #{inspect(name)} is already running"
  def format_error({:data_dir_locked, path}), do: "data dir #{path} is in use by another store or OS process"

  def format_error({:shard_count_mismatch, stored, given}),
    do: "the data dir was created with #{stored} shards, but #{given} were requested"

  def format_error({:foreign_file, path, why}), do: "#{path} is not a shard of this store: #{why}"
  def format_error({:missing_shard, path}), do: "shard file #{path} is missing"
  def format_error({:unsupported_format, found, supported}), do: "format #{found} is newer than supported #{supported}"
  def format_error({:storage, context, message}), do: "storage error (#{context}): #{message}"
  def format_error({:corrupt, seq, why}), do: "corrupt event at seq #{seq}: #{why}"
  def format_error({:tampered, seq, why}) when is_integer(seq), do: "chain broken at seq #{seq}: #{why}"
  def format_error({:tampered, problems}) when is_list(problems), do: "#{length(problems)} broken entity chain(s)"
  def format_error({:panic, message}), do: "internal error in Kuma's native code (the VM is unaffected): #{message}"
  def format_error({:unknown_aggregate, module}), do: "#{inspect(module)} is not an aggregate of this store"

  def format_error({:aggregate_mismatch, live}),
    do: "the entity is live as a #{inspect(live)}; entity ids name one stream, whatever the aggregate"

  def format_error({:no_handle, module}), do: "#{inspect(module)} has no handle/2, so it takes no commands"
  def format_error({:user_code_crashed, where, message}), do: "#{where} raised (nothing was written): #{message}"
  def format_error({:replay_failed, seq, message}), do: "replaying event #{seq} failed: #{message}"
  def format_error({:init_failed, _, message}), do: "init/1 failed: #{message}"
  def format_error({:entity_down, reason}), do: "the entity's process exited: #{inspect(reason)}"
  def format_error({:entity_start_failed, reason}), do: "the entity's process could not start: #{inspect(reason)}"
  def format_error({:partial, results}), do: "#{Enum.count(results, &match?({:error, _}, &1))} batch entries failed"
  def format_error(:entity_erased), do: "the entity was erased; its id cannot be written or read again"
  def format_error({:subject_erased, id}), do: "the subject #{inspect(id)} of a sensitive value was erased"
  def format_error(:wrong_master_key), do: "the master key does not open this store's keystore; nothing was changed"
  def format_error({:missing_master_key, why}), do: "no master key: #{why}"
  def format_error({:missing_keystore, path}), do: "the store is encrypted but its keystore #{path} is missing"

  def format_error({:encryption_mismatch, :store_is_encrypted}),
    do: "the store was created with encryption; it cannot be opened with encryption: false"

  def format_error({:encryption_mismatch, :store_is_plain}),
    do: "the store was created with encryption: false; it cannot be opened encrypted"

  def format_error({:decrypt_failed, seq, why}), do: "event #{seq} did not decrypt (altered or misplaced): #{why}"

  def format_error({:forget_unconfirmed, pids}),
    do: "erased, but #{length(pids)} forget listener(s) did not confirm; call delete again to retry"

  def format_error({:unknown_projection, name}), do: "no projection named #{inspect(name)} is running"
  def format_error({:sql, nil, message}), do: "SQL failed: #{message}"
  def format_error({:sql, index, message}), do: "SQL statement #{index} failed: #{message}"
  def format_error({:foreign_projection, path, why}), do: "#{path} belongs to another store or projection: #{why}"

  def format_error({:invalid_schema, module, reason}),
    do: "the schema of #{inspect(module)} failed: #{format_error(reason)}"

  def format_error(:nothing_to_skip), do: "the projection is not stuck on an event"
  def format_error(:projection_stopped), do: "the projection stopped while waiting"
  def format_error(:timeout), do: "timed out waiting for the commit; the append may still complete"
  def format_error(other), do: inspect(other)

  # -- argument checks ------------------------------------------------------------------

  defp check_entity_id(id) when is_binary(id) and id != "", do: :ok
  defp check_entity_id(""), do: {:error, {:invalid, :entity_id, "must not be empty"}}
  defp check_entity_id(_), do: {:error, {:invalid, :entity_id, "must be a binary"}}

  defp expected_seq(nil), do: {:ok, nil}
  defp expected_seq(n) when is_integer(n) and n >= 0, do: {:ok, n}
  defp expected_seq(_), do: {:error, {:invalid, :expected_seq, "must be a non-negative integer"}}

  defp check_non_neg(_what, n) when is_integer(n) and n >= 0, do: :ok
  defp check_non_neg(what, _), do: {:error, {:invalid, what, "must be a non-negative integer"}}

  defp check_options(opts, allowed), do: Store.Config.check_keys(opts, allowed)
end
