defmodule Kuma.Projection.Supervisor do
  @moduledoc false
  # One per store, last child of the store's supervisor: the projections and read models
  # configured with the store (`projections:`), and a DynamicSupervisor for those started
  # later and for subscriptions. Runners contain user-code failures themselves, so a
  # restart here means a bug or a kill; the generous intensity keeps one bad projection
  # from taking the store down with it.
  use Supervisor

  alias Kuma.Projection.{Runner, Spec}
  alias Kuma.Store

  def start_link(config),
    do: Supervisor.start_link(__MODULE__, config, name: Store.via(config.name, :projection_sup))

  @impl true
  def init(config) do
    dynamic =
      {DynamicSupervisor,
       name: Store.via(config.name, :projections), strategy: :one_for_one, max_restarts: 100, max_seconds: 10}

    # Cluster mode: the projections run where the cluster places them (one owner each),
    # started and stopped by Kuma.Cluster.Projections.
    configured =
      if config.cluster,
        do: [{Kuma.Cluster.Projections, config}],
        else: Enum.map(config.projection_specs, &Runner.child_spec/1)

    children = [dynamic | configured]
    Supervisor.init(children, strategy: :one_for_one, max_restarts: 100, max_seconds: 10)
  end

  @doc """
  Starts a runner for `spec` under the store's dynamic supervisor: `{:error,
  {:already_started, name}}` if a projection of that name runs.
  """
  @spec start_runner(Store.t(), Spec.t()) :: {:ok, pid()} | {:error, term()}
  def start_runner(%Store{} = s, %Spec{} = spec) do
    case DynamicSupervisor.start_child(Store.via(s.name, :projections), Runner.child_spec(spec)) do
      {:ok, pid} -> {:ok, pid}
      {:error, {:already_started, _}} -> {:error, {:already_started, spec.name}}
      {:error, {reason, {:child, _, _, _, _, _, _, _}}} -> {:error, reason}
      {:error, reason} -> {:error, reason}
    end
  catch
    :exit, _ -> {:error, {:no_store, s.name}}
  end

  @doc "Stops the runner of projection `name` of store `store` (see `Kuma.Projection.stop/1`)."
  @spec stop_runner(atom(), atom(), pid()) :: :ok | {:error, term()}
  def stop_runner(store, name, pid) do
    # Through its supervisor: a permanent child stopped any other way is restarted.
    case DynamicSupervisor.terminate_child(Store.via(store, :projections), pid) do
      :ok -> :ok
      {:error, :not_found} -> Supervisor.terminate_child(Store.via(store, :projection_sup), {Runner, name})
    end
  end
end
