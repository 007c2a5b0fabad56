defmodule Kuma.Entity.Reaper do
  @moduledoc false
  # Passivates entities of one store. Time is counted in epochs: an atomic counter this
  # process advances every tick. Live entities record the epoch of their last write and
  # reads bump it (at most once per epoch), so "idle" means "no read or write for N epochs",
  # and the least recently used entities are those with the smallest epoch.
  #
  # Each tick:
  # - entities idle for `idle_timeout` get {:passivate, threshold}; they re-check their row
  #   (a read may have happened since) and stop;
  # - if more than `max_live_entities` are live, the oldest get {:passivate, :infinity};
  # - rows left behind by entity processes that crashed are removed.

  use GenServer

  alias Kuma.Store

  def start_link(store_name), do: GenServer.start_link(__MODULE__, store_name, name: Store.via(store_name, :reaper))

  @doc false
  # Tick length in ms: a quarter of the idle timeout, between 10 ms and 1 s.
  def tick_ms(:infinity), do: 1000
  def tick_ms(idle_timeout), do: idle_timeout |> div(4) |> max(10) |> min(1000)

  @impl true
  def init(store_name) do
    {:ok, s} = Store.lookup(store_name)
    tick = tick_ms(s.idle_timeout)
    Process.send_after(self(), :tick, tick)
    {:ok, %{store_name: store_name, tick: tick}}
  end

  @impl true
  def handle_info(:tick, %{tick: tick} = state) do
    with {:ok, s} <- Store.lookup(state.store_name) do
      epoch = :atomics.add_get(s.epoch, 1, 1)
      passivate_idle(s, epoch, tick)
      enforce_max(s)
    end

    Process.send_after(self(), :tick, tick)
    {:noreply, state}
  end

  defp passivate_idle(%Store{idle_timeout: :infinity}, _epoch, _tick), do: :ok

  defp passivate_idle(s, epoch, tick) do
    idle_epochs = div(s.idle_timeout + tick - 1, tick)
    threshold = epoch - idle_epochs
    # Rows whose last-used epoch is older than the threshold: {id, pid, _, _, _, epoch}.
    spec = [{{:_, :"$1", :_, :_, :_, :"$2"}, [{:<, :"$2", threshold}], [:"$1"]}]

    for pid <- :ets.select(s.entities, spec), do: send(pid, {:passivate, threshold})
  end

  defp enforce_max(%Store{max_live_entities: :infinity}), do: :ok

  defp enforce_max(s) do
    if :ets.info(s.entities, :size) > s.max_live_entities do
      {live, dead} =
        s.entities
        |> :ets.select([{{:"$1", :"$2", :_, :_, :_, :"$3"}, [], [{{:"$1", :"$2", :"$3"}}]}])
        |> Enum.split_with(fn {_id, pid, _epoch} -> Process.alive?(pid) end)

      for {id, pid, _} <- dead, do: :ets.match_delete(s.entities, {id, pid, :_, :_, :_, :_})
      excess = length(live) - s.max_live_entities

      if excess > 0 do
        live
        |> Enum.sort_by(fn {_id, _pid, epoch} -> epoch end)
        |> Enum.take(excess)
        |> Enum.each(fn {_id, pid, _} -> send(pid, {:passivate, :infinity}) end)
      end
    end
  end
end
