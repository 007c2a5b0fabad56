defmodule Kuma.Store.Supervisor do
  @moduledoc false
  # One per store; registered as {name, :supervisor} in Kuma.Registry. Also starts and
  # stops stores for `Kuma.start/1`, `Kuma.start_link/1` and `Kuma.stop/1` (the process
  # tree is drawn in Kuma.Store's moduledoc and docs/architecture.md).
  use Supervisor

  alias Kuma.Store

  @doc "Starts a store under Kuma's own DynamicSupervisor (`Kuma.start/1`)."
  @spec start(keyword()) :: {:ok, Store.t()} | {:error, term()}
  def start(opts) do
    with {:ok, config} <- Store.Config.validate(opts) do
      spec = %{
        id: {:kuma_store, config.name},
        start: {__MODULE__, :start_link, [config]},
        type: :supervisor,
        restart: :transient
      }

      case DynamicSupervisor.start_child(Kuma.Stores, spec) do
        {:ok, _pid} ->
          Store.lookup(config.name)

        {:error, reason} ->
          forget_key(config)
          {:error, start_error(reason, config.name)}
      end
    end
  end

  @doc "Starts a store linked to the caller (`Kuma.start_link/1`, `{Kuma, opts}`)."
  @spec start_opts(keyword()) :: Supervisor.on_start()
  def start_opts(opts) do
    with {:ok, config} <- Store.Config.validate(opts) do
      case start_link(config) do
        {:ok, pid} ->
          {:ok, pid}

        {:error, reason} ->
          forget_key(config)
          {:error, start_error(reason, config.name)}
      end
    end
  end

  # The master key stays in the vault as long as the store's supervisor runs (its restarts
  # of the owner need it), no longer.
  defp forget_key(%{master_key: nil}), do: :ok
  defp forget_key(%{master_key: ref}), do: Kuma.Keys.Vault.drop(ref)

  defp start_error({:already_started, _pid}, name), do: {:already_started, name}
  defp start_error({:shutdown, {:failed_to_start_child, _child, reason}}, name), do: start_error(reason, name)
  defp start_error({:shutdown, reason}, name), do: start_error(reason, name)
  defp start_error(reason, _name), do: reason

  @doc "Stops a store (`Kuma.stop/1`)."
  @spec stop(Store.t() | Store.name()) :: :ok | {:error, term()}
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

  def start_link(config) do
    Supervisor.start_link(__MODULE__, config, name: Store.via(config.name, :supervisor))
  end

  @impl true
  def init(config) do
    if config.master_key, do: Kuma.Keys.Vault.claim(config.master_key, self())

    # Cluster mode: this node's shard members, a proposer for each shard it leads, and the
    # gate its reads pass, right after the owner (which joined the cluster and opened the
    # shards).
    cluster =
      if config.cluster,
        do: [
          {DynamicSupervisor, name: Store.via(config.name, :proposers), strategy: :one_for_one},
          {Kuma.Cluster.ReadGate, config.name},
          %{id: Kuma.Cluster.Shards, start: {Kuma.Cluster.Shards, :start_link, [config.name]}, shutdown: 30_000},
          {Kuma.Cluster.Rebalancer, config.name}
        ],
        else: []

    children =
      [{Kuma.Store.Owner, config}] ++
        cluster ++
        [
          {Kuma.Feed, config.name},
          {PartitionSupervisor, child_spec: DynamicSupervisor, name: Store.via(config.name, :entities)},
          {Kuma.Entity.Reaper, config.name},
          {Kuma.Projection.Supervisor, config}
        ] ++ if(config.http, do: [{Kuma.HTTP, config}], else: [])

    Supervisor.init(children, strategy: :rest_for_one, max_restarts: 3, max_seconds: 5)
  end
end
