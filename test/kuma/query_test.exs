defmodule Kuma.QueryTest do
  use Kuma.StoreCase, async: false

  alias Kuma.Position

  doctest Kuma.Query

  test "query by type and scope across shards, in order, with paging", %{store: store} do
    for i <- 1..200 do
      scope = Enum.at(["org:acme/a", "org:acme/b", "org:other", nil], rem(i, 4))
      type = if rem(i, 5) == 0, do: :paid, else: :viewed
      metadata = if scope, do: %{scope: scope}, else: %{}
      {:ok, _} = Kuma.append(store, "q#{rem(i, 13)}", {type, i}, metadata: metadata)
    end

    all = for n <- 0..12, {:ok, events} = Kuma.events(store, "q#{n}"), e <- events, do: e

    expect = fn pred -> all |> Enum.filter(pred) |> Enum.map(&{&1.entity_id, &1.seq}) |> Enum.sort() end

    {:ok, paid} = Kuma.query(store, type: :paid, limit: 1000)
    assert paid |> Enum.map(&{&1.entity_id, &1.seq}) |> Enum.sort() == expect.(&(&1.type == "paid"))

    {:ok, acme} = Kuma.query(store, scope: "org:acme/*", limit: 1000)

    assert acme |> Enum.map(&{&1.entity_id, &1.seq}) |> Enum.sort() ==
             expect.(&(Map.get(&1.metadata, :scope, "") |> String.starts_with?("org:acme/")))

    {:ok, other} = Kuma.query(store, scope: "org:other", type: "viewed", limit: 1000)
    assert Enum.all?(other, &(&1.metadata.scope == "org:other" and &1.type == "viewed"))
    assert length(other) == length(expect.(&(Map.get(&1.metadata, :scope) == "org:other" and &1.type == "viewed")))

    # In position order within each shard; merged by time.
    for {_s, envs} <- Enum.group_by(acme, & &1.shard),
        do: assert(Enum.map(envs, & &1.position) == Enum.sort(Enum.map(envs, & &1.position)))

    assert Enum.map(acme, & &1.timestamp) == Enum.sort(Enum.map(acme, & &1.timestamp))

    # Paging visits each event exactly once.
    pages =
      Stream.unfold(%{}, fn after_pos ->
        case Kuma.query(store, scope: "org:acme/*", after: after_pos, limit: 7) do
          {:ok, []} -> nil
          {:ok, page} -> {page, Position.merge(after_pos, Position.of(page))}
        end
      end)
      |> Enum.concat()

    assert Enum.map(pages, &{&1.entity_id, &1.seq}) |> Enum.sort() ==
             Enum.map(acme, &{&1.entity_id, &1.seq}) |> Enum.sort()

    last = List.last(all, nil) && Enum.max_by(all, & &1.timestamp)
    {:ok, recent} = Kuma.query(store, from: last.timestamp, limit: 1000)
    assert Enum.all?(recent, &(&1.timestamp >= last.timestamp)) and recent != []

    assert {:error, {:invalid, :limit, _}} = Kuma.query(store, limit: 0)
    assert {:error, {:invalid, :scope, _}} = Kuma.query(store, scope: 5)
    assert {:error, {:invalid, :from, _}} = Kuma.query(store, from: "yesterday")
    assert {:error, {:unknown_option, :entity}} = Kuma.query(store, entity: "x")
  end
end
