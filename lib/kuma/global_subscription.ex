defmodule Kuma.GlobalSubscription do
  @moduledoc false
  # A subscription in the store-wide order (`Kuma.subscribe(store, order: :global)`): sends
  # `{:kuma_event, envelope}` (envelopes carry `:global`) in global order from a position,
  # then live. It reads with Kuma.read_all/2 and sleeps until the Feed tells it the order
  # moved ({:kuma_order, store, watermark}). Like the other subscriptions it holds nothing in
  # memory for a slow subscriber: when the subscriber's mailbox holds `max_queue` messages
  # it stops reading, sends `{:kuma_lagged, %{global: position}}` once, and looks again
  # shortly. It ends with its subscriber.
  use GenServer, restart: :temporary

  alias Kuma.Store

  @lag_poll 10
  @page 500

  def child_spec(args), do: %{id: make_ref(), start: {__MODULE__, :start_link, [args]}, restart: :temporary}

  def start_link(args), do: GenServer.start_link(__MODULE__, args)

  @doc """
  Starts one for the calling process. `from`: `:now`, `:start` or a global position (an
  integer within the order).
  """
  @spec start(Store.t(), term(), pos_integer()) :: {:ok, pid()} | {:error, term()}
  def start(%Store{} = s, from, max_queue) do
    with {:ok, end_pos} <- Kuma.global_position(s),
         {:ok, after_pos} <- start_at(from, end_pos) do
      args = %{store: s.name, subscriber: self(), after: after_pos, max_queue: max_queue}

      case DynamicSupervisor.start_child(Store.via(s.name, :projections), child_spec(args)) do
        {:ok, pid} -> {:ok, pid}
        {:error, reason} -> {:error, reason}
      end
    end
  catch
    :exit, _ -> {:error, {:no_store, s.name}}
  end

  @doc false
  # Where a subscription to the store-wide order starts reading after, for `from` (also
  # Kuma.PersistentSubscription's).
  @spec start_at(term(), non_neg_integer()) :: {:ok, non_neg_integer()} | {:error, term()}
  def start_at(:now, end_pos), do: {:ok, end_pos}
  def start_at(:start, _end), do: {:ok, 0}
  def start_at(n, end_pos) when is_integer(n) and n >= 0 and n <= end_pos, do: {:ok, n}

  def start_at(n, end_pos) when is_integer(n) and n > end_pos,
    do: {:error, {:invalid, :from, "#{n} is past the end of the store-wide order (#{end_pos})"}}

  def start_at(_from, _end),
    do: {:error, {:invalid, :from, "must be :now, :start or a global position (an integer >= 0)"}}

  @impl true
  def init(args) do
    {:ok, s} = Store.lookup(args.store)
    Kuma.Feed.follow_order(s)
    Process.monitor(args.subscriber)
    send(self(), :pump)
    {:ok, Map.merge(args, %{lagging: false, pump: true})}
  end

  @impl true
  def handle_info({:kuma_order, _store, _watermark}, %{pump: true} = st), do: {:noreply, st}
  def handle_info({:kuma_order, _store, _watermark}, st), do: pump(%{st | pump: true})
  def handle_info(:pump, st), do: pump(st)
  def handle_info({:DOWN, _ref, :process, pid, _}, %{subscriber: pid} = st), do: {:stop, :normal, st}
  def handle_info(_other, st), do: {:noreply, st}

  # Reads and sends while there is something to read and room in the subscriber's mailbox.
  defp pump(st) do
    case room(st) do
      0 ->
        unless st.lagging, do: send(st.subscriber, {:kuma_lagged, %{global: st.after}})
        Process.send_after(self(), :pump, @lag_poll)
        {:noreply, %{st | lagging: true, pump: true}}

      room ->
        case Kuma.read_all(st.store, after: st.after, limit: min(room, @page)) do
          {:ok, [], searched} ->
            {:noreply, %{st | after: searched, lagging: false, pump: false}}

          {:ok, envelopes, searched} ->
            Enum.each(envelopes, &send(st.subscriber, {:kuma_event, &1}))
            send(self(), :pump)
            {:noreply, %{st | after: searched, lagging: false, pump: true}}

          {:error, _reason} ->
            Process.send_after(self(), :pump, 1_000)
            {:noreply, %{st | pump: true}}
        end
    end
  end

  defp room(st) do
    case Process.info(st.subscriber, :message_queue_len) do
      {:message_queue_len, n} -> max(st.max_queue - n, 0)
      nil -> 0
    end
  end
end
