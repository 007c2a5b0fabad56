defmodule Kuma.Store.Owner do
  @moduledoc false
  # Owns the native store handle: opens it in init, publishes the Kuma.Store struct in
  # :persistent_term, and on termination unpublishes it and closes the handle (which lets
  # every shard writer commit what is queued, checkpoint, and exit).
  use GenServer

  alias Kuma.{Native, Store}

  def child_spec(config) do
    %{id: __MODULE__, start: {__MODULE__, :start_link, [config]}, shutdown: 60_000}
  end

  def start_link(config), do: GenServer.start_link(__MODULE__, config, name: Store.via(config.name, :owner))

  @impl true
  def init(config) do
    Process.flag(:trap_exit, true)
    close_stale(config.name)

    with {:ok, cluster, cluster_key} <- join(config),
         {:ok, native} <- open(config, cluster_key) do
      {:ok, publish(config, native, cluster)}
    else
      {:error, reason} ->
        if config.cluster, do: Kuma.Cluster.Boot.leave(config.cluster)
        {:stop, reason}
    end
  end

  # The store as every Kuma function sees it, published in :persistent_term.
  defp publish(config, native, cluster) do
    info = Native.store_info(native)

    store = %Store{
      name: config.name,
      native: native,
      data_dir: config.data_dir,
      shards: config.shards,
      sync: config.sync,
      decode: config.decode,
      store_id: info.store_id,
      aggregates: config.aggregates,
      upcasters: config.upcasters,
      snapshot_every: config.snapshot_every,
      idle_timeout: config.idle_timeout,
      max_live_entities: config.max_live_entities,
      # Live entities publish {id, pid, aggregate, state, seq, last_used_epoch} here;
      # reads are served from it without calling the entity (Kuma.Entity).
      entities: :ets.new(:kuma_entities, [:set, :public, read_concurrency: true, write_concurrency: true]),
      # {subject_id, entity_id}: entities whose in-memory state holds a revealed
      # Kuma.Sensitive value of the subject; erasing the subject passivates them.
      sensitive_refs: :ets.new(:kuma_sensitive_refs, [:bag, :public, write_concurrency: true]),
      encrypted: info.encrypted,
      epoch: :atomics.new(1, signed: false),
      file_mode: config.file_mode,
      projections_dir: config.projections_dir,
      keystore_path: if(info.encrypted, do: config.keystore_path || Path.join(config.data_dir, "keystore.kuma")),
      # System.monotonic_time/1 in ms when the store opened (uptime, Kuma.Metrics).
      started_at: System.monotonic_time(:millisecond),
      # Cluster mode: where each shard's leader is (Kuma.Cluster.Route).
      cluster: cluster && %{cluster | routes: :ets.new(:kuma_routes, [:set, :public, read_concurrency: true])}
    }

    :persistent_term.put(Store.key(config.name), store)
    store
  end

  # Opens the native store. The master key comes from the vault here, and goes nowhere else:
  # a raise inside (which would carry the call's arguments in its stack trace) becomes a
  # plain error that names what was wrong, not the arguments.
  defp open(config, cluster_key) do
    with {:ok, master_key} <- master_key(config.master_key) do
      Native.store_open(
        config.data_dir,
        config.shards,
        config.sync,
        config.writer_threads || 0,
        master_key,
        config.keystore_path,
        config.file_mode,
        cluster_key,
        config.tail_bytes,
        config.global_order
      )
    end
  rescue
    e in ArgumentError -> {:error, {:invalid, :options, "the native store refused them: " <> Exception.message(e)}}
  end

  # Cluster mode: join the cluster first, for the key every replica hashes ids with.
  defp join(%{cluster: nil}), do: {:ok, nil, nil}
  defp join(config), do: Kuma.Cluster.Boot.join(config)

  defp master_key(nil), do: {:ok, nil}

  defp master_key(ref) do
    case Kuma.Keys.Vault.fetch(ref) do
      {:ok, key} -> {:ok, key}
      :error -> {:error, {:missing_master_key, "the key given at start is gone (the store was stopped)"}}
    end
  end

  # A previous owner killed without running terminate/2 leaves its handle published and the
  # data dir locked: close it before opening again. The entry stays published until init
  # replaces it, so callers meanwhile get :store_closed (the store is restarting) rather
  # than :no_store, and :persistent_term is updated once (each update costs a global GC pass).
  defp close_stale(name) do
    case :persistent_term.get(Store.key(name), nil) do
      %Store{native: native} -> Native.store_close(native)
      nil -> :ok
    end
  end

  @impl true
  def terminate(_reason, store) do
    :persistent_term.erase(Store.key(store.name))
    if store.cluster, do: Kuma.Cluster.Boot.leave(store.cluster)
    Native.store_close(store.native)
    :ok
  end
end
