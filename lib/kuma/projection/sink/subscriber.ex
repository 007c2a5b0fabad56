defmodule Kuma.Projection.Sink.Subscriber do
  @moduledoc false
  # The sink of `Kuma.subscribe/2`: each event is sent to the subscriber as
  # `{:kuma_event, envelope}`. Nothing is buffered in memory: events are read from storage
  # only while the subscriber's mailbox has room (`:max_queue`), so a slow subscriber is
  # told it lags and catches up later, and memory stays bounded. The position lives in
  # memory only; there is nothing to park, save or forget.

  @behaviour Kuma.Projection.Sink

  defstruct [:pid, :max_queue]

  @impl true
  def open(spec, _s) do
    Process.monitor(spec.subscriber)
    {:ok, %__MODULE__{pid: spec.subscriber, max_queue: spec.max_queue}, %{}, nil}
  end

  @impl true
  def room(sink, batch_size) do
    case Process.info(sink.pid, :message_queue_len) do
      {:message_queue_len, n} -> max(min(batch_size, sink.max_queue - n), 0)
      nil -> 0
    end
  end

  @impl true
  def full(sink, position) do
    send(sink.pid, {:kuma_lagged, position})
    :ok
  end

  @impl true
  def durable?, do: false

  @impl true
  def handle(sink, envelope) do
    send(sink.pid, {:kuma_event, envelope})
    {:ok, [], sink}
  end

  @impl true
  def commit(_sink, _shard, _mark, _done), do: :ok

  @impl true
  def park(_sink, _failure), do: :ok

  @impl true
  def save(_sink, _checkpoint), do: :ok

  @impl true
  def forget(sink, _entity_id), do: {:ok, sink}

  @impl true
  def rebuild(sink, _spec, _s), do: {:ok, sink, %{}, nil}

  @impl true
  def parked(_sink), do: {:ok, []}

  @impl true
  def parked_count(_sink), do: 0

  @impl true
  def close(_sink), do: :ok
end
