defmodule Kuma.PersistentSubscriptionTest do
  # Persistent subscriptions (Kuma.subscribe_persistent/3, ack/2, nack/3): competing
  # consumers get every event at least once; the stored position is what was acknowledged
  # and delivery resumes after it (restart, kill of the subscription, kill -9 of the VM);
  # at most max_in_flight out; one entity's events in order with partition_by; bad input.
  use Kuma.StoreCase, async: false

  alias Kuma.Test.ChildVM

  @moduletag timeout: 120_000

  defp write(store, n, prefix \\ "p") do
    for i <- 1..n, do: {:ok, _} = Kuma.append(store, "#{prefix}-#{rem(i, 17)}", {:e, i})
    assert eventually(fn -> match?({:ok, m} when m >= n, Kuma.global_position(store)) end, 500, 10)
  end

  # A consumer process: forwards what it gets to `parent` and acks it (unless told not to).
  defp consumer(store, name, parent, opts \\ [], ack? \\ true) do
    spawn_link(fn ->
      {:ok, sub} = Kuma.subscribe_persistent(store, name, opts)
      send(parent, {:joined, self(), sub})
      consume(sub, parent, ack?)
    end)
  end

  defp consume(sub, parent, ack?) do
    receive do
      {:kuma_event, ^sub, e} ->
        send(parent, {:got, self(), e})
        # (An ack to a subscription killed meanwhile fails; the event comes again.)
        if ack?, do: Kuma.ack(sub, e)
        consume(sub, parent, ack?)

      :stop ->
        :ok
    end
  end

  defp collect(n, acc \\ []) do
    if length(acc) >= n do
      Enum.reverse(acc)
    else
      receive do
        {:got, pid, e} -> collect(n, [{pid, e} | acc])
      after
        5_000 -> Enum.reverse(acc)
      end
    end
  end

  defp joined do
    receive do
      {:joined, pid, sub} -> {pid, sub}
    after
      5_000 -> flunk("consumer did not join")
    end
  end

  defp position(sub) do
    {:ok, %{position: p}} = Kuma.PersistentSubscription.info(sub)
    p
  end

  test "competing consumers share every event, and the position follows the acks", %{store: store} do
    write(store, 150)
    c1 = consumer(store, "shared", self())
    {_, sub} = joined()
    c2 = consumer(store, "shared", self())
    joined()
    got = collect(150)
    assert got |> Enum.map(fn {_, e} -> e.global end) |> Enum.sort() == Enum.to_list(1..150)
    assert got |> Enum.map(&elem(&1, 0)) |> Enum.uniq() |> Enum.sort() == Enum.sort([c1, c2])
    assert eventually(fn -> position(sub) == 150 end)

    # Live: new events go on to the consumers.
    write(store, 10, "later")
    assert collect(10) |> Enum.map(fn {_, e} -> e.global end) |> Enum.sort() == Enum.to_list(151..160)
  end

  test "unacknowledged events go to another consumer when theirs leaves; at most max_in_flight out",
       %{store: store} do
    write(store, 40)
    lazy = consumer(store, "handover", self(), [max_in_flight: 5], false)
    {_, sub} = joined()
    first = collect(5)
    refute_receive {:got, _, _}, 200
    assert length(first) == 5
    assert {:ok, %{in_flight: 5}} = Kuma.PersistentSubscription.info(sub)

    send(lazy, :stop)
    _worker = consumer(store, "handover", self())
    joined()
    got = collect(40)
    assert got |> Enum.map(fn {_, e} -> e.global end) |> Enum.sort() == Enum.to_list(1..40)
    assert eventually(fn -> position(sub) == 40 end)
  end

  test "delivery resumes after the acknowledged position: after a restart, and after a kill of the subscription",
       %{store: store, dir: dir, name: name} do
    write(store, 30)
    c = consumer(store, "resume", self())
    {_, sub} = joined()
    assert length(collect(30)) == 30
    assert eventually(fn -> position(sub) == 30 end)
    send(c, :stop)

    # Restart the store: the position was stored; nothing acknowledged comes again.
    :ok = Kuma.stop(store)
    {:ok, store} = Kuma.start(name: name, data_dir: dir, shards: 4)
    write_more = fn -> for i <- 1..5, do: {:ok, _} = Kuma.append(store, "after-#{i}", {:n, i}) end
    write_more.()
    consumer(store, "resume", self())
    {_, sub} = joined()
    assert collect(5) |> Enum.map(fn {_, e} -> e.global end) == Enum.to_list(31..35)
    refute_receive {:got, _, _}, 200

    # Killed without a chance to store: what it had acknowledged in the last 100 ms may
    # come again, what it had not always does; nothing is skipped.
    for i <- 1..20, do: {:ok, _} = Kuma.append(store, "more-#{i}", {:n, i})
    got = collect(20)
    Process.exit(sub, :kill)
    {:ok, _} = Kuma.append(store, "last", {:n, 1})
    consumer(store, "resume", self())
    joined()
    again = collect(1 + 20) |> Enum.map(fn {_, e} -> e.global end)
    assert 56 in again
    assert Enum.sort(Enum.uniq(Enum.map(got, fn {_, e} -> e.global end) ++ again)) == Enum.to_list(36..56)
  end

  test "partition_by: :entity_id hands one entity's events to one consumer, one at a time, in order",
       %{store: store} do
    # The consumers first, so that they stay the same while the events come.
    for _ <- 1..3, do: consumer(store, "parted", self(), partition_by: :entity_id, max_in_flight: 8)
    for _ <- 1..3, do: joined()
    for round <- 1..10, id <- ["a", "b", "c", "d", "e", "f"], do: {:ok, _} = Kuma.append(store, id, {:round, round})
    got = collect(60)
    assert length(got) == 60

    for {_id, events} <- Enum.group_by(got, fn {_, e} -> e.entity_id end) do
      assert Enum.map(events, fn {_, e} -> e.seq end) == Enum.to_list(1..10)
      # One consumer per entity while the consumers stay the same.
      assert events |> Enum.map(&elem(&1, 0)) |> Enum.uniq() |> length() == 1
    end
  end

  test "bad input: too many consumers, an ack never delivered, a start past the end, unknown names",
       %{store: store} do
    write(store, 3)
    consumer(store, "small", self(), max_consumers: 1)
    {_, sub} = joined()
    collect(3)
    assert {:error, {:too_many_consumers, 1}} = Kuma.subscribe_persistent(store, "small")
    assert {:error, {:not_in_flight, 2}} = Kuma.ack(sub, 2)
    assert {:error, {:not_in_flight, 99}} = Kuma.nack(sub, 99, :retry)
    assert {:error, {:invalid, :action, _}} = Kuma.nack(sub, 1, :later)
    assert {:error, {:invalid, :from, _}} = Kuma.subscribe_persistent(store, "future", from: 4)
    assert {:error, {:invalid, :max_in_flight, _}} = Kuma.subscribe_persistent(store, "x", max_in_flight: 0)
    assert {:error, {:invalid, :name, _}} = Kuma.subscribe_persistent(store, "")
    assert {:error, {:unknown_option, :typo}} = Kuma.subscribe_persistent(store, "x", typo: 1)
    assert {:error, {:unknown_subscription, "never"}} = Kuma.delete_subscription(store, "never")

    assert :ok = Kuma.delete_subscription(store, "small")
    refute Process.alive?(sub)
    assert {:error, {:unknown_subscription, _}} = Kuma.ack(sub, 1)
    # Created again from the start: the old position went with it.
    consumer(store, "small", self())
    joined()
    assert collect(3) |> Enum.map(fn {_, e} -> e.global end) == [1, 2, 3]
  end

  # A separate BEAM: writers append; two consumers of "crash" acknowledge every event and
  # print "ACKED global" once acknowledged.
  @child_script ~S"""
  [dir] = System.argv()
  {:ok, _} = Application.ensure_all_started(:kuma)
  {:ok, store} = Kuma.start(name: :psub_crash, data_dir: dir, shards: 4)
  IO.puts("PID #{System.pid()}")

  for w <- 1..3 do
    spawn(fn ->
      Stream.iterate(0, &(&1 + 1)) |> Enum.each(fn i -> {:ok, _} = Kuma.append(store, "c-#{rem(i * 3 + w, 40)}", {:w, w, i}) end)
    end)
  end

  for _ <- 1..2 do
    spawn(fn ->
      {:ok, sub} = Kuma.subscribe_persistent(store, "crash", max_in_flight: 50)
      loop = fn loop ->
        receive do
          {:kuma_event, ^sub, e} ->
            :ok = Kuma.ack(sub, e)
            IO.puts("ACKED #{e.global}")
            loop.(loop)
        end
      end
      loop.(loop)
    end)
  end

  Process.sleep(:infinity)
  """

  @tag store: false
  test "kill -9 of the VM: delivery resumes after the stored position and no event is skipped",
       %{dir: dir, name: name} do
    {port, os_pid} = ChildVM.start(@child_script, [dir])
    acked = ChildVM.collect(port, MapSet.new(), &acked/2, &(MapSet.size(&1) >= 800))
    # Some hundreds of ms more, so that the position was stored at least once (every 100 ms).
    until = System.monotonic_time(:millisecond) + 400
    acked = ChildVM.collect(port, acked, &acked/2, fn _ -> System.monotonic_time(:millisecond) >= until end)
    ChildVM.kill(os_pid)
    acked = ChildVM.drain(port, acked, &acked/2)

    {:ok, store} = Kuma.start(name: name, data_dir: dir, shards: 4)
    {:ok, total} = Kuma.global_position(store)
    consumer(store, "crash", self())
    joined()
    # Where it resumed: the first event it hands out (the stored position + 1).
    [{_, first} | _] = rest = collect(1)
    again = (rest ++ collect(total - first.global)) |> Enum.map(fn {_, e} -> e.global end)
    resumed = first.global - 1
    IO.puts("persistent kill -9: #{MapSet.size(acked)} acknowledged before, resumed after #{resumed} of #{total}")

    # From the stored position on, everything, in order of position.
    assert Enum.sort(again) == Enum.to_list(first.global..total)
    # Nothing skipped: every event up to it had been acknowledged before the kill.
    assert Enum.all?(1..resumed//1, &MapSet.member?(acked, &1))
    assert resumed > 0, "nothing stored before the kill: #{MapSet.size(acked)} acknowledged"
  end

  defp acked("ACKED " <> g, acked), do: MapSet.put(acked, String.to_integer(g))
  defp acked(_line, acked), do: acked
end
