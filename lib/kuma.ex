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
  `Kuma.Error` lists every reason with its meaning; `format_error/1` turns any reason into
  a sentence. The most common: `{:invalid, what, why}`, `{:unknown_option, key}`,
  `{:wrong_expected_seq, expected, actual}`, `:store_closed`, `{:no_store, name}`,
  `:entity_erased`, `{:storage, context, message}` and `:timeout`.

  ## Limits

  Entity ids: non-empty binaries of at most 512 bytes. Per event: type at most 255 bytes,
  encoded payload at most 8 MiB, encoded metadata at most 64 KiB. Per append: at most
  100,000 events and 64 MiB.
  """

  # The public API: every function documents what it does and delegates to the module
  # that does it (docs/architecture.md maps them). Nothing below calls back into Kuma.

  alias Kuma.{Codec, EventLog, Native, Query, Router, Store, Validate}

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
  * `:tail_bytes` - bytes of each shard's newest committed events kept in memory, in
    clear, so that projections, subscriptions and queries that have caught up read them
    without touching the file or decrypting (default 4 MiB per shard; `0` = off; not kept
    by cluster replicas). See docs/architecture.md, "The live tail"
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

  * `:file_mode` - permissions of the files Kuma creates (default `0o600`, owner only;
    directories get the matching `0o700`); must let the owner read and write
  * `:projections_dir` - directory of the read models' files (default
    `<data_dir>/projections`). Read models are derived from the events and rebuilt from
    them (`Kuma.Projection.rebuild/1`), so they need no backup: put them where backups do
    not reach, and their rows stay out of old copies (see `Kuma.ReadModel`, "Files and
    backups")

  * `:http` - serve Prometheus metrics (`/metrics`) and a live monitor page (`/`):
    `[port: 9568]` (`ip:` defaults to `{127, 0, 0, 1}`; port 0 picks a free one, and
    `info/1` gives the URL). Off by default; see `Kuma.HTTP` and `Kuma.Metrics`. A port in
    use is `{:error, {:http, address, :eaddrinuse}}`

  * `:cluster` - run the store on several nodes, each shard replicated by Raft:
    `[seeds: [node, ...], replicas: 3]`, the same on every node (see `Kuma.Cluster`).
    Without it (the default) the store runs on this node only and nothing of Raft starts

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
  def start(opts), do: Store.Supervisor.start(opts)

  @doc """
  Starts a store linked to the caller; see `start/1` for options. Use it through
  `{Kuma, opts}` in your supervision tree and address the store by its `:name`.
  """
  @spec start_link(keyword()) :: Supervisor.on_start()
  def start_link(opts), do: Store.Supervisor.start_opts(opts)

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

  @doc """
  Stops a store: every queued append is committed, entity heads are checkpointed, files are
  closed and the data directory is unlocked. Returns `{:error, {:no_store, name}}` if it is
  not running.
  """
  @spec stop(store()) :: :ok | {:error, reason()}
  def stop(store), do: Store.Supervisor.stop(store)

  # -- cluster --------------------------------------------------------------------------

  @doc """
  Cluster mode: takes this node out of the cluster. Its shards move to the other nodes
  first, while writes go on (each move adds a replica elsewhere, waits until it has caught
  up, then removes this one and deletes its copy and the keys of its entities here); then
  the node is removed from the cluster's nodes and the store stops here. Projections that
  run here move to other nodes too (`Kuma.Cluster`, "Projections").

  Options: `:timeout` - ms to wait for the moves (default 10 minutes); on timeout
  `{:error, {:leave_unfinished, left}}` (shards, and `{:projection, name}` entries), the moves go on, and a second call waits again.
  A seed (a node that runs a member of the metadata group) hands its member over to
  another active node first; with no such node it cannot leave (`:seed_cannot_leave`:
  start another node first). Nor can a node whose departure would leave fewer
  active nodes than `:replicas` (`{:too_few_nodes, left, replicas}`). `:not_a_cluster` on
  a single-node store. See `Kuma.Cluster`.
  """
  @spec leave(store(), keyword()) :: :ok | {:error, reason()}
  def leave(store, opts \\ []) do
    with {:ok, s} <- Store.lookup(store),
         :ok <- Validate.keys(opts, [:timeout]) do
      Kuma.Cluster.leave(s, Keyword.get(opts, :timeout, 600_000))
    end
  end

  @doc """
  Cluster mode: the cluster as this node sees it, for monitoring:

      %{cluster_id: id, node: this_node,
        nodes: %{node => %{state: :active | :leaving, reachable: boolean, seed: boolean}},
        shards: [%{shard: 0, members: [node], leader: node | nil, term: t,
                   commit_index: i, applied_index: %{node => i}, lag: entries}],
        moves: [%{shard: s, from: node | nil, to: node | nil, since: unix_ms}],
        projections: %{name => %{kind: :projection | :read_model, owner: node | nil, epoch: n}}}

  A member on a node that cannot be reached has no applied index (and counts as lagging
  by the whole commit index). `:not_a_cluster` on a single-node store.
  """
  @spec cluster_info(store()) :: {:ok, map()} | {:error, reason()}
  def cluster_info(store) do
    with {:ok, s} <- Store.lookup(store), do: Kuma.Cluster.info(s)
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
  * `:metadata` - a map stored with every event of this append, or a list of maps, one per
    event (same length as the events)
  * `:timeout` - milliseconds to wait for the commit (default 30,000); on `{:error, :timeout}`
    the append may still commit later
  * `:return` - `:seq` (default) or `:token`: then the result is `{:ok, last_seq, token}`,
    where `token` is the `Kuma.Position` of the events written, for
    `Kuma.Projection.wait_for/3` (read-your-writes)

  A `:scope` in an event's metadata makes it findable by scope (`query/2`, projection and
  subscription filters); see `Kuma.Codec`.
  """
  @spec append(store() | Kuma.Entity.t(), entity_id() | term(), term(), keyword()) ::
          {:ok, pos_integer()} | {:ok, pos_integer(), Kuma.Position.t()} | {:error, reason()}
  def append(store_or_entity, entity_id_or_events, events_or_opts \\ [], opts \\ [])

  def append(%Kuma.Entity{} = entity, events, opts, []) when is_list(opts), do: Kuma.Entity.append(entity, events, opts)

  def append(store, entity_id, events, opts) do
    with {:ok, s} <- Store.lookup(store), do: Router.append(s, entity_id, events, opts)
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
  def append_batch(store, entries, opts \\ []) do
    with {:ok, s} <- Store.lookup(store), do: Router.append_batch(s, entries, opts)
  end

  @doc """
  Waits until every append queued before this call is committed, checkpoints entity heads,
  finishes deleting the events of erased entities and settles the data keys given to new
  entities: once it returns, a store that receives no writes changes no file (a file copy
  of it is consistent).
  """
  @spec flush(store()) :: :ok | {:error, reason()}
  def flush(store) do
    with {:ok, s} <- Store.lookup(store), do: EventLog.flush(s)
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

  Options: `:expected_seq`, `:metadata`, `:timeout` (default 30,000 ms), and for an
  idempotent command `:command_id` and `:since_seq` (see `Kuma.Entity.execute/3`: a
  command whose id is already among the entity's events after `since_seq` is not run
  again; single node).
  """
  @spec execute(Kuma.Entity.t(), term(), keyword()) ::
          {:ok, non_neg_integer()} | {:ok, non_neg_integer(), Kuma.Position.t()} | {:error, reason()}
  defdelegate execute(entity, command, opts \\ []), to: Kuma.Entity

  @doc """
  Whether the idempotent command `command_id` was applied to the entity after
  `since_seq:` (default 0): `{:ok, boolean}`, answered after every write queued before
  the question (see `Kuma.Entity.applied?/3`).
  """
  @spec applied?(Kuma.Entity.t(), binary(), keyword()) :: {:ok, boolean()} | {:error, reason()}
  defdelegate applied?(entity, command_id, opts \\ []), to: Kuma.Entity

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
    Validate.entity_id!(entity_id)
    from = Keyword.get(opts, :from, 1)
    chunk = Keyword.get(opts, :chunk, 500)
    if not (is_integer(from) and from >= 1), do: raise(ArgumentError, ":from must be a positive integer")
    if not (is_integer(chunk) and chunk >= 1), do: raise(ArgumentError, ":chunk must be a positive integer")
    EventLog.stream(store, entity_id, from, chunk)
  end

  @doc """
  Reads up to `:limit` events of an entity (default: all) from `:from` (default 1).
  Like `stream/3` but returns `{:ok, [Kuma.Envelope.t()]}` or `{:error, reason}`.
  """
  @spec events(store(), entity_id(), keyword()) :: {:ok, [Kuma.Envelope.t()]} | {:error, reason()}
  def events(store, entity_id, opts \\ []) do
    with {:ok, s} <- Store.lookup(store) do
      on_leader(s, entity_id, {:events, [entity_id, opts]}, fn -> EventLog.events(s, entity_id, opts) end)
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
         :ok <- Validate.non_neg(:shard, shard),
         :ok <- Validate.non_neg(:after, after_position),
         :ok <- Validate.non_neg(:limit, limit),
         {:ok, {events, _searched, _hash}} <- Query.read_shard(s, shard, after_position, %Query{}, limit) do
      EventLog.decoding(fn -> {:ok, Enum.map(events, &Kuma.Codec.envelope(&1, s))} end)
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
  * `:order` - `:shard` (default: commit order within each shard) or `:global` (the
    store-wide order, below)

  ## A slow subscriber

  Events are read from storage, not buffered in memory. When the subscriber's mailbox holds
  `:max_queue` messages or more, the subscription stops reading and sends
  `{:kuma_lagged, position}` once (the position delivered so far). It resumes on its own
  when the mailbox has room again, from where it stopped, so nothing is lost and memory
  stays bounded by `:max_queue` messages; `position` is also what to pass as `:from` to a
  new subscription after a restart.

  ## Many subscriptions to single entities

  A subscription with `:entity_id` is woken only by commits that wrote its entity (single
  node; in cluster mode by every commit): a framework can give every live aggregate one,
  and 1,000 idle ones cost appends nothing measurable (`mix bench SUBS`).

  ## In the store-wide order

  With `order: :global` the events come in the store-wide order (`read_all/2`), each
  envelope with its `:global` position: `:from` is then `:now`, `:start` or a global
  position, and only `:max_queue` may go with it (no filters). A slow subscriber is told
  `{:kuma_lagged, %{global: position}}`. Single node, unless started with
  `global_order: false`.

  ## Waiting for delivery

  `Kuma.Projection.wait_for(subscription, token)` (the pid returned here, a token from an
  append with `return: :token`) returns `:ok` once every matching event up to the token
  is in the subscriber's mailbox.
  """
  @spec subscribe(store(), keyword()) :: {:ok, pid()} | {:error, reason()}
  def subscribe(store, opts \\ []) do
    with {:ok, s} <- Store.lookup(store) do
      case Keyword.pop(opts, :order, :shard) do
        {:shard, opts} ->
          with {:ok, spec} <- Kuma.Projection.Spec.subscription(s, opts),
               do: Kuma.Projection.Supervisor.start_runner(s, spec)

        {:global, opts} ->
          max_queue = Keyword.get(opts, :max_queue, 10_000)

          with :ok <- Validate.keys(opts, [:from, :max_queue]),
               :ok <- Validate.positive(:max_queue, max_queue),
               do: Kuma.GlobalSubscription.start(s, Keyword.get(opts, :from, :now), max_queue)

        {_other, _opts} ->
          {:error, {:invalid, :order, "must be :shard (the default) or :global"}}
      end
    end
  end

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
    with {:ok, s} <- Store.lookup(store), do: Query.run(s, opts)
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
    with {:ok, s} <- Store.lookup(store), :ok <- Validate.entity_id(entity_id) do
      on_leader(s, entity_id, {:head, [entity_id]}, fn -> EventLog.head(s, entity_id) end)
    end
  end

  @doc "The shard that stores `entity_id` (see docs/storage-format.md for the function)."
  @spec shard_for(store(), entity_id()) :: {:ok, non_neg_integer()} | {:error, reason()}
  def shard_for(store, entity_id) do
    with {:ok, s} <- Store.lookup(store), :ok <- Validate.entity_id(entity_id) do
      {:ok, Native.store_shard_for(s.native, entity_id)}
    end
  end

  # -- the store-wide order ---------------------------------------------------------------

  @doc """
  Events of every entity in the store-wide order: one gapless sequence of *global
  positions* over all shards, in the order the commits completed (a write acknowledged
  before another began comes first). This is the `$all` stream frameworks read.

  Options: `:after` (a global position, default 0: from the start), `:limit` (default
  100, at most 10,000). Returns `{:ok, envelopes, searched}`: envelopes carry `:global`,
  and `searched` is what to pass as `:after` to read on (an erased event keeps its number
  and is left out, so a page may hold fewer events than numbers). `Kuma.global_position/1`
  is the end. An event becomes readable here shortly after its append is acknowledged
  (the order is recorded after the commit, in its own file): wait for
  `global_position/1` to pass it if a reader must see its own write.

  A single-node store keeps the order unless started with `global_order: false`; in
  cluster mode each shard has its own order only (`{:error, {:invalid, :global_order,
  _}}`). Errors: an `:after` past the end, a bad `:limit`.
  """
  @spec read_all(store(), keyword()) :: {:ok, [Kuma.Envelope.t()], non_neg_integer()} | {:error, reason()}
  def read_all(store, opts \\ []) do
    with {:ok, s} <- Store.lookup(store),
         :ok <- Validate.keys(opts, [:after, :limit]),
         {:ok, end_pos} <- global_position(s),
         {:ok, after_pos} <- global_after(Keyword.get(opts, :after, 0), end_pos),
         {:ok, limit} <- global_limit(Keyword.get(opts, :limit, 100)),
         {:ok, {events, globals, searched}} <- Native.read_all(s.native, after_pos, limit) do
      envelopes = Enum.zip_with(events, globals, fn e, g -> %{Codec.envelope(e, s) | global: g} end)
      {:ok, envelopes, searched}
    end
  end

  @doc """
  `read_all/2` as a lazy stream, page by page (`:after`, and `:chunk`: events per read,
  default 500), up to the end of the order when the stream is started.
  """
  @spec stream_all(store(), keyword()) :: Enumerable.t()
  def stream_all(store, opts \\ []) do
    chunk = Keyword.get(opts, :chunk, 500)

    Stream.resource(
      fn ->
        {:ok, end_pos} = global_position(store)
        {Keyword.get(opts, :after, 0), end_pos}
      end,
      fn
        {after_pos, end_pos} when after_pos >= end_pos ->
          {:halt, {after_pos, end_pos}}

        {after_pos, end_pos} ->
          case read_all(store, after: after_pos, limit: chunk) do
            {:ok, envelopes, searched} -> {Enum.filter(envelopes, &(&1.global <= end_pos)), {searched, end_pos}}
            {:error, reason} -> raise Kuma.Error, reason: reason
          end
      end,
      fn _ -> :ok end
    )
  end

  @doc """
  The end of the store-wide order: the last global position readers can see
  (`{:ok, n}`, 0 for an empty store).
  """
  @spec global_position(store()) :: {:ok, non_neg_integer()} | {:error, reason()}
  def global_position(store) do
    with {:ok, s} <- Store.lookup(store) do
      case s.cluster == nil and Native.store_global_position(s.native) do
        n when is_integer(n) -> {:ok, n}
        false -> {:error, {:invalid, :global_order, "in cluster mode each shard has its own order only"}}
        nil -> {:error, {:invalid, :global_order, "this store was started with global_order: false"}}
      end
    end
  end

  defp global_after(n, end_pos) when is_integer(n) and n >= 0 and n <= end_pos, do: {:ok, n}

  defp global_after(n, end_pos) when is_integer(n) and n > end_pos,
    do: {:error, {:invalid, :after, "#{n} is past the end of the store-wide order (#{end_pos})"}}

  defp global_after(_n, _end), do: {:error, {:invalid, :after, "must be a global position (an integer >= 0)"}}

  defp global_limit(n) when is_integer(n) and n in 1..10_000, do: {:ok, n}
  defp global_limit(_n), do: {:error, {:invalid, :limit, "must be an integer in 1..10,000"}}

  # -- persistent subscriptions -----------------------------------------------------------

  @doc """
  Joins the caller, as a consumer, to the persistent subscription `name` (a string),
  creating it on first use: `{:ok, subscription}`. Events of the store-wide order arrive
  as `{:kuma_event, subscription, envelope}`; acknowledge each with `ack/2`. The
  subscription's position (everything acknowledged) is stored durably, so delivery
  resumes after restarts and `kill -9`, at least once. Options, used when the
  subscription is created: `:from` (`:start` (default), `:now`, a global position),
  `:max_in_flight` (100), `:max_consumers` (10), `:partition_by` (`nil` or `:entity_id`:
  one entity's events one at a time, in order). See `Kuma.PersistentSubscription`.
  Errors: `{:too_many_consumers, max}`, a start past the end, bad options; single node.
  """
  @spec subscribe_persistent(store(), String.t(), keyword()) :: {:ok, pid()} | {:error, reason()}
  def subscribe_persistent(store, name, opts \\ []) do
    with {:ok, s} <- Store.lookup(store), do: Kuma.PersistentSubscription.join(s, name, opts)
  end

  @doc """
  Acknowledges an event (its envelope, or its global position) delivered to the caller
  by a persistent subscription. `{:error, {:not_in_flight, global}}` for an event that
  is not out to the caller.
  """
  @spec ack(pid(), Kuma.Envelope.t() | pos_integer()) :: :ok | {:error, reason()}
  def ack(subscription, event), do: Kuma.PersistentSubscription.ack(subscription, event)

  @doc """
  Gives an event back: `:retry` hands it out again (to any consumer), `:skip` counts it as
  handled.
  """
  @spec nack(pid(), Kuma.Envelope.t() | pos_integer(), :retry | :skip) :: :ok | {:error, reason()}
  def nack(subscription, event, action), do: Kuma.PersistentSubscription.nack(subscription, event, action)

  @doc "The caller stops consuming (its unacknowledged events go to the others); the subscription stays."
  @spec unsubscribe_persistent(pid()) :: :ok | {:error, reason()}
  def unsubscribe_persistent(subscription), do: Kuma.PersistentSubscription.leave(subscription)

  @doc "Deletes a persistent subscription and its stored position: `{:error, {:unknown_subscription, name}}` if none."
  @spec delete_subscription(store(), String.t()) :: :ok | {:error, reason()}
  def delete_subscription(store, name) do
    with {:ok, s} <- Store.lookup(store), do: Kuma.PersistentSubscription.delete(s, name)
  end

  # -- snapshots for frameworks ---------------------------------------------------------

  @doc """
  Saves a framework's snapshot of an entity: `data` (any term) as the state at `version`,
  the entity's seq it reflects. For frameworks that run their own aggregates; Kuma's own
  entities snapshot themselves (`:snapshot_every`). Sealed under the entity's key,
  exported and erased with the entity. See `Kuma.Snapshots`. Option `:timeout`.
  """
  @spec save_snapshot(store(), entity_id(), pos_integer(), term(), keyword()) :: :ok | {:error, reason()}
  def save_snapshot(store, entity_id, version, data, opts \\ []) do
    with {:ok, s} <- Store.lookup(store) do
      on_leader(s, entity_id, {:save_snapshot, [entity_id, version, data, opts]}, fn ->
        Kuma.Snapshots.save(s, entity_id, version, data, opts)
      end)
    end
  end

  @doc """
  The latest snapshot saved with `save_snapshot/5` (option `:at_most`: the latest at or
  before that version): `{:ok, %{version: v, timestamp: us, data: term}}` or `{:ok, nil}`.
  """
  @spec read_snapshot(store(), entity_id(), keyword()) :: {:ok, Kuma.Snapshots.t() | nil} | {:error, reason()}
  def read_snapshot(store, entity_id, opts \\ []) do
    with {:ok, s} <- Store.lookup(store) do
      on_leader(s, entity_id, {:read_snapshot, [entity_id, opts]}, fn -> Kuma.Snapshots.read(s, entity_id, opts) end)
    end
  end

  @doc "Deletes the snapshots saved with `save_snapshot/5` for an entity. Option `:timeout`."
  @spec delete_snapshots(store(), entity_id(), keyword()) :: :ok | {:error, reason()}
  def delete_snapshots(store, entity_id, opts \\ []) do
    with {:ok, s} <- Store.lookup(store) do
      on_leader(s, entity_id, {:delete_snapshots, [entity_id, opts]}, fn ->
        Kuma.Snapshots.delete(s, entity_id, opts)
      end)
    end
  end

  # -- data protection ------------------------------------------------------------------

  @doc """
  Erases an entity (GDPR Art. 17): stops its process, deletes its events and snapshots,
  destroys its data key, tells forget listeners (read models) to drop it, and leaves no
  readable trace in the files or in old backups. See `Kuma.Erasure` for the exact steps.

  Accepts an entity handle (`Kuma.delete(entity)`) or a store and an id. Returns
  `{:ok, %{events_deleted: n}}` once the erasure is durable and the entity unreadable (its
  tombstone committed, its key destroyed). Its events are then deleted from the shard file
  in chunks between the shard's other writes, so erasing a long history never stalls the
  shard; `erasure_status/2` says when that is done, and `flush/1` waits for it. Afterwards
  appends to the id return `{:error, :entity_erased}`. Idempotent.

  Options: `:timeout` (ms for the storage erasure, default 60,000), `:forget_timeout` (ms to
  wait for listeners, default 5,000).
  """
  @spec delete(store() | Kuma.Entity.t(), entity_id() | keyword(), keyword()) ::
          {:ok, %{events_deleted: non_neg_integer()}} | {:error, reason()}
  def delete(store_or_entity, entity_id_or_opts \\ [], opts \\ [])

  def delete(%Kuma.Entity{store: store, id: id}, opts, []) when is_list(opts), do: delete(store, id, opts)

  def delete(store, entity_id, opts) do
    with {:ok, s} <- Store.lookup(store),
         :ok <- Validate.keys(opts, [:timeout, :forget_timeout]),
         :ok <- Validate.timeout(opts),
         :ok <- Validate.timeout(opts, :forget_timeout),
         :ok <- Validate.entity_id(entity_id) do
      on_leader(s, entity_id, {:delete, [entity_id, opts]}, fn -> Kuma.Erasure.delete(s, entity_id, opts) end,
        timeout: Keyword.get(opts, :timeout, 60_000),
        write: true
      )
    end
  end

  @doc """
  Whether the erasure of `entity_id` is complete everywhere it must be:
  `{:ok, %{complete: boolean, members: %{node => status}}}`, one status per node holding
  the entity's shard:

  * `:done` - the node applied the erasure, and none of its files holds anything of the
    entity (in cluster mode, including Raft's log files: see docs/cluster.md, "Erasure");
  * `:pending` - applied (the entity is unreadable there), but its events are still being
    deleted from the shard file (in chunks, between other writes: milliseconds per
    thousand events), or in cluster mode Raft's log files there still hold entries from
    before it (pushed out within seconds while the node is up);
  * `:not_applied` - the node has not applied an erasure of this id (it is down, or
    catching up, or the entity was never erased);
  * `:unreachable` - the node did not answer.

  `complete` is true when every node is `:done`. On a single node the erasure is complete
  once its last events are deleted, shortly after `delete/3` returns; `flush/1` waits
  for that.
  """
  @spec erasure_status(store(), entity_id()) ::
          {:ok, %{complete: boolean(), members: %{node() => :done | :pending | :not_applied | :unreachable}}}
          | {:error, reason()}
  def erasure_status(store, entity_id) do
    with {:ok, s} <- Store.lookup(store), :ok <- Validate.entity_id(entity_id) do
      Kuma.Erasure.status(s, entity_id)
    end
  end

  @doc """
  Whether `entity_id` was erased with `delete/3`.
  """
  @spec erased?(store(), entity_id()) :: {:ok, boolean()} | {:error, reason()}
  def erased?(store, entity_id) do
    with {:ok, s} <- Store.lookup(store), :ok <- Validate.entity_id(entity_id) do
      on_leader(s, entity_id, {:erased?, [entity_id]}, fn -> Native.read_erased(s.native, entity_id) end)
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

  @doc false
  def export(store, entity_id, aggregate) do
    with {:ok, s} <- Store.lookup(store), :ok <- Validate.entity_id(entity_id) do
      on_leader(s, entity_id, {:export, [entity_id, aggregate]}, fn -> Kuma.Export.export(s, entity_id, aggregate) end)
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
  base64) in one keystore transaction; events are not touched. After `{:ok, %{keys: n}}`
  only the new key opens the store. Store the new key where the store reads it from
  (option, file or environment variable) before the next start; keep the old one until a
  start with the new one has succeeded.

  If the call does not return (the VM crashes or is killed during it), either key may be
  the one in effect: the transaction is atomic, so exactly one of them opens the store,
  but it can have committed before the crash although no answer was given. Start with the
  new key; on `{:error, :wrong_master_key}` (which changes nothing) start with the old one
  and rotate again.
  """
  @spec rotate_master_key(store(), binary()) :: {:ok, %{keys: non_neg_integer()}} | {:error, reason()}
  def rotate_master_key(store, new_key) do
    case Store.lookup(store) do
      {:ok, %Store{cluster: nil} = s} -> Kuma.Keys.rotate(s, new_key)
      {:ok, _cluster} -> {:error, {:not_supported_in_cluster, :rotate_master_key}}
      error -> error
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
    with {:ok, s} <- Store.lookup(store), :ok <- Validate.entity_id(entity_id) do
      on_leader(s, entity_id, {:verify, [entity_id]}, fn -> EventLog.verify(s, entity_id) end)
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
    with {:ok, s} <- Store.lookup(store),
         :ok <- Validate.keys(opts, [:on_progress]) do
      EventLog.verify_store(s, Keyword.get(opts, :on_progress, fn _, _, _ -> :ok end))
    end
  end

  @doc """
  Rewrites every shard file, one at a time (SQLite `VACUUM`): the space of erased entities
  goes back to the file system, and no stale copy of a row SQLite moved between pages
  stays in free space. Each shard's writes wait while it is rewritten (about as long as
  copying the file). Erasure does this by itself in stores created with `encryption:
  false`; in encrypted stores such copies are sealed under keys erasure destroyed, so
  compaction only reclaims space.

  Options: `:on_progress` - called as `fun.(shard, shards)` after each shard; `:timeout` -
  ms per shard (default 10 minutes). Returns `{:ok, %{shards: n}}`.
  """
  @spec compact(store(), keyword()) :: {:ok, %{shards: pos_integer()}} | {:error, reason()}
  def compact(store, opts \\ []) do
    with {:ok, s} <- Store.lookup(store),
         :ok <- Validate.keys(opts, [:on_progress, :timeout]),
         :ok <- Validate.timeout(opts) do
      EventLog.compact(s, Keyword.get(opts, :on_progress, fn _, _ -> :ok end), Keyword.get(opts, :timeout, 600_000))
    end
  end

  @doc """
  Takes an online backup of the store into `dir` (which must not exist, or be empty) while
  writes go on: a consistent copy of every shard, the store-wide order and persistent
  subscriptions, each as a segment framed with CRC32, and a manifest with per-shard
  positions and chain heads. The backup is written into a temporary directory beside `dir`
  and renamed into place at the end: an interrupted backup leaves no `dir` behind.

  Options: `keystore: true` also copies the keystore (default `false`: see "Backups and
  erasure" in `Kuma.Backup`); `on_progress: fun(%{phase: :copy, done, total, segment,
  bytes})` is called after each file.

  Returns `{:ok, %{dir, bytes, segments, shards: [%{shard, position, entities, events}],
  keystore, seconds}}`. Errors: `{:backup_dir_not_empty, dir}`, `{:backup_dir, path,
  posix_reason}` (cannot be written), `{:storage, context, message}`.
  """
  @spec backup(store(), Path.t(), keyword()) :: {:ok, map()} | {:error, reason()}
  def backup(store, dir, opts \\ []) do
    with {:ok, s} <- Store.lookup(store), do: Kuma.Backup.backup(s, dir, opts)
  end

  @doc """
  Restores the backup in `backup_dir` as a new data dir `data_dir` (which must not exist,
  or be empty; no store may be running on it). Every frame of every segment is checked
  against the backup's manifest before anything is written; the files are then written to
  a temporary directory beside `data_dir`, each shard's chain heads compared with the
  manifest, the store opened there and every chain recomputed (`verify_store/2`), and the
  directory renamed into place. Start the store on `data_dir` afterwards as usual.

  Options: `master_key:` or `master_key_file:` (encrypted stores: as for `start/1`);
  `keystore_path:` the keystore to restore with, used where it is and not copied (the
  store's current one: then entities erased after the backup stay erased; required when the
  backup holds no keystore; start the store with the same `keystore_path:`); `file_mode:`;
  `on_progress: fun(%{phase: :check | :write | :verify, done, total, segment, bytes})`.

  Returns `{:ok, %{dir, bytes, shards, keystore: true | false | :external, events,
  entities, taken, seconds}}`. Errors: `{:not_a_backup, path, why}`, `{:backup_format,
  found, supported}`, `{:backup_damaged, file, frame, why}` (the first bad frame; frame 0
  is a segment's header), `{:restore_target_not_empty, dir}`, `{:backup_dir, path,
  posix_reason}`, `{:tampered, problems}`, and any error of `start/1`.
  """
  @spec restore(Path.t(), Path.t(), keyword()) :: {:ok, map()} | {:error, reason()}
  def restore(backup_dir, data_dir, opts \\ []), do: Kuma.Backup.restore(backup_dir, data_dir, opts)

  @doc "Facts about a running store: id, shards, data dir, sync mode, encryption and per-shard writer counters."
  @spec info(store()) :: {:ok, map()} | {:error, reason()}
  def info(store) do
    with {:ok, s} <- Store.lookup(store), do: {:ok, Store.info(s)}
  end

  # -- cluster mode -------------------------------------------------------------------

  # Cluster mode: a call about an entity runs on its shard's leader, as the same facade
  # function called there with the store's name (Kuma.Cluster.Route). Single node: here.
  defp on_leader(s, entity_id, call, local, opts \\ [])
  defp on_leader(%Store{cluster: nil}, _entity_id, _call, local, _opts), do: local.()

  defp on_leader(s, entity_id, {fun, args}, local, opts) do
    timeout = Keyword.get(opts, :timeout, EventLog.default_timeout())
    route = Kuma.Cluster.Route

    with :ok <- Validate.entity_id(entity_id) do
      route.run(s, route.shard(s, entity_id), {__MODULE__, fun, [s.name | args]}, timeout, local, opts)
    end
  end

  # -- errors ---------------------------------------------------------------------------

  @doc "A human-readable sentence for any error reason Kuma returns (see `Kuma.Error`)."
  @spec format_error(reason()) :: String.t()
  defdelegate format_error(reason), to: Kuma.Error, as: :format
end
