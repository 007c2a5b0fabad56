defmodule Kuma.Application do
  @moduledoc false
  use Application

  @impl true
  def start(_type, _args) do
    children = [
      {Registry, keys: :unique, name: Kuma.Registry, partitions: System.schedulers_online()},
      # Forget listeners (Kuma.Erasure): read models that must drop an erased entity.
      {Registry, keys: :duplicate, name: Kuma.Listeners},
      # Master keys between Kuma.start/1 and the store that opens with them.
      Kuma.Keys.Vault,
      {DynamicSupervisor, name: Kuma.Stores, strategy: :one_for_one}
    ]

    Supervisor.start_link(children, strategy: :one_for_one, name: Kuma.Supervisor)
  end
end
