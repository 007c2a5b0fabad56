defmodule Kuma.Projection.Sink.SubscriberTest do
  use Kuma.StoreCase, async: false

  import Kuma.Test.ProjectionHelpers

  test "a slow subscriber's mailbox stays bounded and it still gets every event", %{store: store} do
    {:ok, sub} = Kuma.subscribe(store, max_queue: 100)
    batches = for b <- 1..40, do: {"s#{rem(b, 8)}", for(i <- 1..50, do: {:e, b, i})}
    {:ok, _} = Kuma.append_batch(store, batches)
    Process.sleep(300)

    {:message_queue_len, queued} = Process.info(self(), :message_queue_len)
    assert queued <= 101, "mailbox holds #{queued} messages"
    assert_received {:kuma_lagged, position} when is_map(position)

    events = receive_events(2_000, [])
    assert length(events) == 2_000
    assert events |> Enum.map(&{&1.entity_id, &1.seq}) |> Enum.uniq() |> length() == 2_000

    for {_id, per_entity} <- Enum.group_by(events, & &1.entity_id) do
      assert Enum.map(per_entity, & &1.seq) == Enum.to_list(1..length(per_entity))
    end

    Kuma.unsubscribe(sub)
    refute Process.alive?(sub)
  end

  test "subscriptions filter, start from now or from the start, and end with the caller", %{store: store} do
    {:ok, _} = Kuma.append(store, "early", {:created, 1})
    {:ok, _} = Kuma.subscribe(store, type: :created)
    {:ok, _} = Kuma.subscribe(store, entity_id: "early", from: :start)
    {:ok, _} = Kuma.append(store, "early", {:updated, 2})
    {:ok, _} = Kuma.append(store, "early-bird", {:created, 3})

    got = receive_events(4, []) |> Enum.map(&{&1.entity_id, &1.type}) |> Enum.sort()
    # :created after subscribing (not early's first); everything of "early" (not early-bird).
    assert got == [{"early", "created"}, {"early", "updated"}, {"early-bird", "created"}]
    refute_receive {:kuma_event, _}, 100

    parent = self()
    child = spawn(fn -> send(parent, Kuma.subscribe(store)) end)
    assert_receive {:ok, sub}
    ref = Process.monitor(sub)
    refute Process.alive?(child)
    assert_receive {:DOWN, ^ref, :process, ^sub, _}, 1_000
    assert {:error, {:invalid, :from, _}} = Kuma.subscribe(store, from: :yesterday)
    assert {:error, {:unknown_option, :typo}} = Kuma.subscribe(store, typo: 1)
  end
end
