defmodule Kuma.Application do
  @moduledoc false
  use Application

  @impl true
  def start(_type, _args) do
    children = [
      {Registry, keys: :unique, name: Kuma.Registry, partitions: System.schedulers_online()},
      {DynamicSupervisor, name: Kuma.Stores, strategy: :one_for_one}
    ]

    Supervisor.start_link(children, strategy: :one_for_one, name: Kuma.Supervisor)
  end
end
