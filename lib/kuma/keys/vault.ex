defmodule Kuma.Keys.Vault do
  @moduledoc false
  # Holds master keys between `Kuma.start/1`, which reads them, and the store's owner, which
  # opens the keystore with them (again after every restart), so that no key travels in a
  # process's state, a child spec, an error term or a crash report: those only ever hold a
  # reference. The keys live in a private ETS table of this process. An entry goes when the
  # store's supervisor that claimed it exits, or when its start fails.
  use GenServer

  @spec start_link(term()) :: GenServer.on_start()
  def start_link(_), do: GenServer.start_link(__MODULE__, nil, name: __MODULE__)

  @doc "Stores a key; returns the reference that stands for it."
  @spec put(binary()) :: reference()
  def put(key) when is_binary(key), do: GenServer.call(__MODULE__, {:put, key})

  @doc "The key behind `ref`."
  @spec fetch(reference()) :: {:ok, binary()} | :error
  def fetch(ref), do: GenServer.call(__MODULE__, {:fetch, ref})

  @doc "Ties the key's lifetime to `pid`: it is dropped when `pid` exits."
  @spec claim(reference(), pid()) :: :ok
  def claim(ref, pid), do: GenServer.call(__MODULE__, {:claim, ref, pid})

  @doc "Drops the key now."
  @spec drop(reference()) :: :ok
  def drop(ref), do: GenServer.call(__MODULE__, {:drop, ref})

  @impl true
  def init(nil), do: {:ok, :ets.new(__MODULE__, [:set, :private])}

  @impl true
  def handle_call({:put, key}, _from, table) do
    ref = make_ref()
    :ets.insert(table, {ref, key, nil})
    {:reply, ref, table}
  end

  def handle_call({:fetch, ref}, _from, table) do
    case :ets.lookup(table, ref) do
      [{^ref, key, _}] -> {:reply, {:ok, key}, table}
      [] -> {:reply, :error, table}
    end
  end

  def handle_call({:claim, ref, pid}, _from, table) do
    if :ets.member(table, ref), do: :ets.update_element(table, ref, {3, Process.monitor(pid)})
    {:reply, :ok, table}
  end

  def handle_call({:drop, ref}, _from, table) do
    :ets.delete(table, ref)
    {:reply, :ok, table}
  end

  @impl true
  def handle_info({:DOWN, monitor, :process, _pid, _reason}, table) do
    :ets.match_delete(table, {:_, :_, monitor})
    {:noreply, table}
  end

  # A crash report of this process shows neither its table nor the message it was handling
  # (gen_server's format_status/1, OTP 25; Elixir 1.14's GenServer does not declare it yet).
  @doc false
  def format_status(status), do: status |> Map.put(:state, :redacted) |> Map.put(:message, :redacted)
end
