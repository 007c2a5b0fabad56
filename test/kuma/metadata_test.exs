defmodule Kuma.MetadataTest do
  # Metadata per event (`metadata: [map, ...]`, one per event) as well as per append: what
  # frameworks carry per event (event, causation and correlation ids). It must come back
  # with its own event on every read path, and bad input must change nothing.
  use Kuma.StoreCase, async: true

  import Kuma.Test.ProjectionHelpers

  doctest Kuma.Envelope

  alias Bank.Account.Deposited

  @moduletag store_opts: [aggregates: [Bank.Account]]

  @metas [%{event_id: "e-1", correlation_id: "c"}, %{}, %{event_id: "e-3", causation_id: "e-1"}]

  test "each event keeps its own metadata: events, query, subscriptions, export", %{store: store} do
    {:ok, _sub} = Kuma.subscribe(store, entity_id: "m1", from: :start)
    {:ok, 3} = Kuma.append(store, "m1", [{:a, 1}, {:b, 2}, {:c, 3}], metadata: @metas)

    {:ok, events} = Kuma.events(store, "m1")
    assert Enum.map(events, & &1.metadata) == @metas

    {:ok, found} = Kuma.query(store, type: :c)
    assert [%{metadata: %{event_id: "e-3", causation_id: "e-1"}}] = found

    assert receive_events(3, []) |> Enum.map(& &1.metadata) == @metas

    {:ok, export} = Kuma.export(store, "m1")
    assert Enum.map(export.events, & &1.metadata) == @metas
    {:ok, json} = Kuma.export_json(store, "m1")
    assert json =~ ~s("event_id":"e-3")

    # One map for all still goes with every event.
    {:ok, 5} = Kuma.append(store, "m1", [{:d, 4}, {:e, 5}], metadata: %{batch: 7})
    {:ok, events} = Kuma.events(store, "m1", from: 4)
    assert Enum.map(events, & &1.metadata) == [%{batch: 7}, %{batch: 7}]
  end

  test "per-event metadata through an entity process and in bulk appends", %{store: store} do
    entity = Kuma.entity(store, Bank.Account, "acct-1")
    {:ok, 2} = Kuma.append(entity, [%Deposited{amount: 5}, %Deposited{amount: 7}], metadata: [%{n: 1}, %{n: 2}])
    assert Kuma.read(entity).balance == 12

    {:ok, [_, _]} =
      Kuma.append_batch(store, [
        {"bulk-1", [{:x, 1}, {:x, 2}], metadata: [%{n: 3}, %{n: 4}]},
        {"bulk-2", [{:x, 3}], metadata: [%{n: 5}]}
      ])

    assert metas(store, "acct-1") == [%{n: 1}, %{n: 2}]
    assert metas(store, "bulk-1") == [%{n: 3}, %{n: 4}]
    assert metas(store, "bulk-2") == [%{n: 5}]
  end

  test "a scope per event: each event found by its own", %{store: store} do
    {:ok, 2} = Kuma.append(store, "s1", [{:t, 1}, {:t, 2}], metadata: [%{scope: "org:a"}, %{scope: "org:b/x"}])
    {:ok, [a]} = Kuma.query(store, scope: "org:a")
    {:ok, [b]} = Kuma.query(store, scope: "org:b/*")
    assert {a.seq, b.seq} == {1, 2}
  end

  test "a list of the wrong length, a non-map or a bad scope in it: an error and nothing written",
       %{store: store} do
    assert {:error, {:invalid, :metadata, why}} = Kuma.append(store, "bad", [{:a, 1}, {:b, 2}], metadata: [%{}])
    assert why =~ "one map per event"
    assert {:error, {:invalid, :metadata, _}} = Kuma.append(store, "bad", [{:a, 1}], metadata: [:nope])
    assert {:error, {:invalid, :scope, _}} = Kuma.append(store, "bad", [{:a, 1}], metadata: [%{scope: ""}])

    assert {:error, {:invalid, :metadata, _}} =
             Kuma.append_batch(store, [{"bad-2", [{:a, 1}]}, {"bad", [{:a, 1}, {:b, 2}], metadata: [%{}]}])

    assert {:ok, nil} = Kuma.head(store, "bad")
    assert {:ok, nil} = Kuma.head(store, "bad-2")
  end

  test "event ids: the same on every read path and after a restart, distinct for distinct events",
       %{store: store, dir: dir, name: name} do
    {:ok, 3} = Kuma.append(store, "ids", [{:a, 1}, {:a, 1}, {:a, 1}])
    {:ok, events} = Kuma.events(store, "ids")
    ids = Enum.map(events, &Kuma.Envelope.event_id/1)
    assert length(Enum.uniq(ids)) == 3
    assert Enum.all?(ids, &Regex.match?(~r/^[0-9a-f]{8}-[0-9a-f]{4}-8[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/, &1))

    assert eventually(fn -> match?({:ok, n} when n >= 3, Kuma.global_position(store)) end)
    {:ok, all, _} = Kuma.read_all(store)
    assert Enum.map(all, &Kuma.Envelope.event_id/1) == ids
    {:ok, export} = Kuma.export(store, "ids")
    assert Enum.map(export.events, &Kuma.Envelope.event_id/1) == ids

    :ok = Kuma.stop(store)
    {:ok, store} = Kuma.start(name: name, data_dir: dir, shards: 4, aggregates: [Bank.Account])
    {:ok, again} = Kuma.events(store, "ids")
    assert Enum.map(again, &Kuma.Envelope.event_id/1) == ids
  end

  defp metas(store, id) do
    {:ok, events} = Kuma.events(store, id)
    Enum.map(events, & &1.metadata)
  end
end
