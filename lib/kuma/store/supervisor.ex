defmodule Kuma.Store.Supervisor do
  @moduledoc false
  # One per store; registered as {name, :supervisor} in Kuma.Registry.
  use Supervisor

  def start_link(config) do
    Supervisor.start_link(__MODULE__, config, name: Kuma.Store.via(config.name, :supervisor))
  end

  @impl true
  def init(config) do
    children = [
      {Kuma.Store.Owner, config},
      {Kuma.Feed, config.name},
      {PartitionSupervisor, child_spec: DynamicSupervisor, name: Kuma.Store.via(config.name, :entities)},
      {Kuma.Entity.Reaper, config.name},
      {Kuma.Projection.Supervisor, config}
    ]

    Supervisor.init(children, strategy: :rest_for_one, max_restarts: 3, max_seconds: 5)
  end
end
