defmodule Kuma.FeedTest do
  # Kuma.Feed: every commit reaches every follower, after the follower's starting heads,
  # in commit order per shard, with nothing polled.
  use Kuma.StoreCase, async: true

  alias Kuma.{Feed, Store}

  test "a follower hears every commit after the heads it started from, in order", %{store: store} do
    {:ok, s} = Store.lookup(store.name)
    {:ok, 1} = Kuma.append(store, "before", :e)
    start = Feed.follow(s)
    assert Enum.sum(Map.values(start)) == 1

    ids = for i <- 1..40, do: "after-#{i}"
    for id <- ids, do: {:ok, _} = Kuma.append(store, id, [:a, :b])

    commits = collect_commits(store.name, 80, start)
    # Per shard, announced positions only grow and end at the shard's head.
    heads = Feed.heads(s)

    for {shard, positions} <- commits do
      # A commit from before following may still be told (the heads already cover it).
      positions = Enum.filter(positions, &(&1 > Map.get(start, shard, 0)))
      assert positions == Enum.sort(positions) and positions == Enum.uniq(positions)
      assert List.last(positions) == heads[shard]
    end

    assert Enum.sum(Map.values(heads)) == 81
  end

  test "heads is the last committed position of every shard", %{store: store} do
    {:ok, s} = Store.lookup(store.name)
    assert Feed.heads(s) == %{0 => 0, 1 => 0, 2 => 0, 3 => 0}
    {:ok, _, token} = Kuma.append(store, "x", [:a, :b, :c], return: :token)
    assert Kuma.Position.covers?(Feed.heads(s), token)
    assert {:ok, Feed.heads(s)} == Kuma.position(store)
  end

  # Collects {:kuma_commit, ...} until every shard reached its head (or `left` commits).
  defp collect_commits(name, events, start, acc \\ %{}) do
    done = Enum.sum(for {shard, ps} <- acc, do: List.last(ps) - Map.get(start, shard, 0))

    if done >= events do
      acc
    else
      receive do
        {:kuma_commit, ^name, shard, pos} ->
          collect_commits(name, events, start, Map.update(acc, shard, [pos], &(&1 ++ [pos])))
      after
        2_000 -> flunk("commits stopped after #{done} of #{events} events: #{inspect(acc)}")
      end
    end
  end
end
