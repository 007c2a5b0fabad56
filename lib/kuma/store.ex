defmodule Kuma.Store do
  @moduledoc """
  A running store: the value `Kuma.start/1` returns and every `Kuma` function accepts.

  A store is addressed either by this struct or by its `:name` (an atom). Names are looked
  up in `:persistent_term` (a constant-time read with no copying); the struct holds the
  native handle directly. After `Kuma.stop/1`, calls through an old struct return
  `{:error, :store_closed}` and calls by name `{:error, {:no_store, name}}`.

  Process layout of one store (all under `Kuma.Stores` when started with `Kuma.start/1`,
  or under your supervisor when started from `{Kuma, opts}`; docs/architecture.md draws
  the whole tree):

      Kuma.Store.Supervisor (rest_for_one)
      ├── Kuma.Store.Owner            opens the shards, owns the native handle and the entity
      │                               state table; closes the handle on stop
      ├── Kuma.Feed                   tells projections and subscriptions of every commit
      ├── PartitionSupervisor         one DynamicSupervisor per scheduler, for entity processes
      │   └── Kuma.Entity.Server      one per live entity (started on first use)
      ├── Kuma.Entity.Reaper          passivates idle entities and enforces max_live_entities
      └── Kuma.Projection.Supervisor  projections configured with the store, and a
          └── DynamicSupervisor       for projections, read models and subscriptions started later
              └── Kuma.Projection.Runner  one per projection, read model or subscription

  `rest_for_one`: if the owner restarts, everything after it restarts against the new
  handle (entities lazily, on next use).
  """

  # Every field is set by Kuma.Store.Owner from the validated options (Kuma.Store.Config
  # holds the defaults), so none has a default here.
  @enforce_keys [
    :name,
    :native,
    :data_dir,
    :shards,
    :sync,
    :decode,
    :store_id,
    :aggregates,
    :upcasters,
    :snapshot_every,
    :idle_timeout,
    :max_live_entities,
    :entities,
    :sensitive_refs,
    :encrypted,
    :epoch,
    :file_mode,
    :projections_dir,
    :keystore_path,
    :started_at,
    :cluster
  ]
  defstruct @enforce_keys

  @type name :: atom()
  @type t :: %__MODULE__{
          name: name(),
          native: reference(),
          data_dir: Path.t(),
          shards: pos_integer(),
          sync: :normal | :full,
          decode: :trusted | :safe,
          store_id: String.t(),
          aggregates: [module()],
          upcasters: [module() | (term(), Kuma.Envelope.t() -> term())],
          snapshot_every: pos_integer() | nil,
          idle_timeout: pos_integer() | :infinity,
          max_live_entities: pos_integer() | :infinity,
          entities: :ets.tid() | nil,
          sensitive_refs: :ets.tid() | nil,
          encrypted: boolean(),
          epoch: :atomics.atomics_ref() | nil,
          file_mode: non_neg_integer(),
          projections_dir: Path.t(),
          keystore_path: Path.t() | nil,
          started_at: integer(),
          cluster: nil | %Kuma.Cluster{}
        }

  @doc false
  def key(name), do: {__MODULE__, name}

  @doc "Resolves a store struct or name."
  @spec lookup(t() | name()) :: {:ok, t()} | {:error, term()}
  def lookup(%__MODULE__{} = store), do: {:ok, store}

  def lookup(name) when is_atom(name) do
    case :persistent_term.get(key(name), nil) do
      nil -> {:error, {:no_store, name}}
      store -> {:ok, store}
    end
  end

  def lookup(other), do: {:error, {:invalid, :store, "expected a Kuma.Store or a store name, got: #{inspect(other)}"}}

  @doc false
  # The file of shard `shard` under `data_dir` (docs/storage-format.md; kuma_core's
  # shard::shard_path names it the same way).
  @spec shard_file(Path.t(), non_neg_integer()) :: Path.t()
  def shard_file(data_dir, shard),
    do: Path.join([data_dir, "shards", String.pad_leading(Integer.to_string(shard), 3, "0") <> ".kuma"])

  @doc false
  def via(name, role), do: {:via, Registry, {Kuma.Registry, {name, role}}}

  @doc false
  def whereis(name, role) do
    case Registry.lookup(Kuma.Registry, {name, role}) do
      [{pid, _}] -> pid
      [] -> nil
    end
  end

  @doc false
  # Facts about a running store (`Kuma.info/1`).
  @spec info(t()) :: map()
  def info(%__MODULE__{} = s) do
    %{
      name: s.name,
      store_id: s.store_id,
      data_dir: s.data_dir,
      shards: s.shards,
      sync: s.sync,
      encrypted: s.encrypted,
      writers: Kuma.Native.store_stats(s.native),
      http: Kuma.HTTP.url(s.name)
    }
  end
end
