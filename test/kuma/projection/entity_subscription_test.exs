defmodule Kuma.Projection.EntitySubscriptionTest do
  # A subscription to one entity is told only of the commits that wrote that entity
  # (Kuma.Feed.follow_entity/2) and reads on from just before its first event in each (the
  # runner's jump). What must hold: it still gets every event of its entity, once, in
  # order, from the tail in memory or from the file, and an idle subscription to another
  # entity is not woken by commits at all.
  use Kuma.StoreCase, async: false

  import Kuma.Test.ProjectionHelpers

  defp write_around(store, watched, per_writer) do
    # 20 writers over 200 other entities (every shard), one writer on the watched entity.
    others =
      for w <- 1..20 do
        Task.async(fn ->
          for n <- 1..per_writer, do: {:ok, _} = Kuma.append(store, "other-#{rem(w * 31 + n, 200)}", {:noise, w, n})
        end)
      end

    mine = Task.async(fn -> for n <- 1..per_writer, do: {:ok, _} = Kuma.append(store, watched, {:mine, n}) end)
    Task.await_many([mine | others], 60_000)
  end

  # Commit messages a runner took from its mailbox while `fun` ran (traced).
  defp commits_seen(pids, fun) do
    for pid <- pids, do: :erlang.trace(pid, true, [:receive])
    fun.()
    for pid <- pids, do: :erlang.trace(pid, false, [:receive])
    count_commits(0)
  end

  defp count_commits(n) do
    receive do
      {:trace, _pid, :receive, message} when elem(message, 0) in [:kuma_commit, :kuma_entity_commit] ->
        count_commits(n + 1)

      {:trace, _pid, :receive, _other} ->
        count_commits(n)
    after
      200 -> n
    end
  end

  for tail <- [:on, :off] do
    @tag store_opts: if(tail == :off, do: [tail_bytes: 0], else: [])
    test "with the live tail #{tail}: every event of the watched entity, once and in order; idle ones never woken",
         %{store: store} do
      {:ok, _} = Kuma.append(store, "watched", {:mine, 0})
      {:ok, _sub} = Kuma.subscribe(store, entity_id: "watched", from: :start)
      idle = for i <- 1..30, do: elem(Kuma.subscribe(store, entity_id: "idle-#{i}"), 1)

      seen = commits_seen(idle, fn -> write_around(store, "watched", 150) end)

      events = receive_events(151, [])
      assert Enum.map(events, & &1.seq) == Enum.to_list(1..151)
      assert Enum.map(events, & &1.data) == for(n <- 0..150, do: {:mine, n})
      refute_receive {:kuma_event, _}, 200
      assert seen == 0, "idle subscriptions were sent #{seen} commit messages"

      # An idle subscription still gets its entity's first event when it comes.
      {:ok, _} = Kuma.append(store, "idle-7", {:at_last, 1})
      assert [%{entity_id: "idle-7", data: {:at_last, 1}}] = receive_events(1, [])
    end
  end

  test "a subscription that fell behind its entity reads what it missed from the file", %{store: store} do
    # The subscriber's mailbox holds 10 events: the rest waits on disk while other
    # entities' commits push the tail past it.
    {:ok, _sub} = Kuma.subscribe(store, entity_id: "slow", max_queue: 10)
    for n <- 1..50, do: {:ok, _} = Kuma.append(store, "slow", {:n, n})
    write_around(store, "slow-too", 300)
    for n <- 51..60, do: {:ok, _} = Kuma.append(store, "slow", {:n, n})

    events = receive_events(60, [])
    assert Enum.map(events, & &1.data) == for(n <- 1..60, do: {:n, n})
  end

  test "a writer waits until its event was handed to a subscription", %{store: store} do
    {:ok, sub} = Kuma.subscribe(store, entity_id: "acct")
    {:ok, _, token} = Kuma.append(store, "acct", {:opened, 1}, return: :token)
    assert :ok = Kuma.Projection.wait_for(sub, token, 5_000)
    assert_received {:kuma_event, %{entity_id: "acct", data: {:opened, 1}}}

    # A token of other entities, in other shards too, is covered without any event.
    tokens = for i <- 1..20, do: elem(Kuma.append(store, "else-#{i}", {:x, i}, return: :token), 2)
    assert :ok = Kuma.Projection.wait_for(sub, Enum.reduce(tokens, &Kuma.Position.merge/2), 5_000)
    refute_received {:kuma_event, _}

    assert {:error, {:unknown_projection, _}} = Kuma.Projection.wait_for(self(), token, 100)
    Kuma.unsubscribe(sub)
    assert {:error, {:unknown_projection, ^sub}} = Kuma.Projection.wait_for(sub, token, 100)
  end
end
