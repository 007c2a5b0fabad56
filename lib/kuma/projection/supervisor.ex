defmodule Kuma.Projection.Supervisor do
  @moduledoc false
  # One per store, last child of the store's supervisor: the projections and read models
  # configured with the store (`projections:`), and a DynamicSupervisor for those started
  # later and for subscriptions. Runners contain user-code failures themselves, so a
  # restart here means a bug or a kill; the generous intensity keeps one bad projection
  # from taking the store down with it.
  use Supervisor

  def start_link(config),
    do: Supervisor.start_link(__MODULE__, config, name: Kuma.Store.via(config.name, :projection_sup))

  @impl true
  def init(config) do
    dynamic =
      {DynamicSupervisor,
       name: Kuma.Store.via(config.name, :projections), strategy: :one_for_one, max_restarts: 100, max_seconds: 10}

    children = [dynamic | Enum.map(config.projection_specs, &Kuma.Projection.Runner.child_spec/1)]
    Supervisor.init(children, strategy: :one_for_one, max_restarts: 100, max_seconds: 10)
  end
end
