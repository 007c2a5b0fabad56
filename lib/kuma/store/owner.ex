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

    case Native.store_open(config.data_dir, config.shards, config.sync) do
      {:ok, native} ->
        info = Native.store_info(native)

        store = %Store{
          name: config.name,
          native: native,
          data_dir: config.data_dir,
          shards: config.shards,
          sync: config.sync,
          decode: config.decode,
          store_id: info.store_id
        }

        :persistent_term.put(Store.key(config.name), store)
        {:ok, store}

      {:error, reason} ->
        {:stop, reason}
    end
  end

  # A previous owner killed without running terminate/2 leaves its handle published and the
  # data dir locked: close it before opening again.
  defp close_stale(name) do
    case :persistent_term.get(Store.key(name), nil) do
      %Store{native: native} ->
        :persistent_term.erase(Store.key(name))
        Native.store_close(native)

      nil ->
        :ok
    end
  end

  @impl true
  def terminate(_reason, store) do
    :persistent_term.erase(Store.key(store.name))
    Native.store_close(store.native)
    :ok
  end
end
