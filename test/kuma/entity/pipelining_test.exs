defmodule Kuma.Entity.PipeliningTest do
  # Writes that wait for a busy entity are decided one after another on the state the ones
  # before them left and appended together (Kuma.Entity.Server, "pipelining"). What must
  # hold: each caller gets its own seq and answer, in one total order, as if the writes had
  # run one at a time; a write that fails fails alone; nothing is committed twice.
  use Kuma.StoreCase, async: true

  @moduletag store_opts: [aggregates: [__MODULE__.Tally]]

  defmodule Tally do
    @moduledoc false
    @behaviour Kuma.Aggregate

    @impl true
    def init(_id), do: []

    # {:add, tag, probe}: probe is nil or {pid, entity}; the pid is told what this decision
    # saw: its own state and the committed one (the entity's row, read from memory).
    @impl true
    def handle(state, {:add, tag, probe}) do
      with {pid, entity} <- probe do
        {:ok, committed} = Kuma.Entity.fetch(entity)
        send(pid, {:decided, tag, length(state), length(committed)})
      end

      {:ok, [{:added, tag}]}
    end

    def handle(_state, {:reject, _tag}), do: {:error, :rejected}
    def handle(_state, :nothing), do: {:ok, []}
    def handle(_state, :crash), do: raise("boom")

    @impl true
    def apply(state, {:added, tag}), do: [tag | state]
    def apply(state, _other), do: state
  end

  # Suspends the entity's process, sends `writes` (funs) one after another so they queue in
  # that order, resumes it, and returns each write's answer.
  defp queued(entity, writes) do
    Kuma.read(entity)
    {:ok, %{pid: pid}} = Kuma.Entity.info(entity)
    :sys.suspend(pid)

    tasks =
      writes
      |> Enum.with_index(1)
      |> Enum.map(fn {write, n} ->
        task = Task.async(write)
        wait_until(fn -> Process.info(pid, :message_queue_len) == {:message_queue_len, n} end)
        task
      end)

    :sys.resume(pid)
    Enum.map(tasks, &Task.await(&1, 10_000))
  end

  defp wait_until(check, tries \\ 500) do
    cond do
      check.() -> :ok
      tries == 0 -> flunk("condition not reached")
      true -> Process.sleep(2) && wait_until(check, tries - 1)
    end
  end

  defp datas(store, id) do
    {:ok, events} = Kuma.events(store, id)
    Enum.map(events, & &1.data)
  end

  test "writes queued behind a busy entity are decided on each other's state and committed together",
       %{store: store} do
    entity = Kuma.entity(store, Tally, "t1")
    probe = {self(), entity}
    # Each caller reads the entity right after its answer: its write must be in what it reads.
    write = fn tag -> fn -> {Kuma.execute(entity, {:add, tag, probe}), tag in Kuma.read(entity)} end end
    answers = queued(entity, for(tag <- 1..30, do: write.(tag)))

    # Each caller its own seq, in the order the writes were queued, and reads its own write.
    assert answers == for(seq <- 1..30, do: {{:ok, seq}, true})
    assert datas(store, "t1") == for(tag <- 1..30, do: {:added, tag})

    # Each decision saw the ones before it, none of them committed yet: one append.
    decided = for _ <- 1..30, do: assert_receive({:decided, _tag, _seen, _committed})
    assert Enum.map(decided, &elem(&1, 2)) == Enum.to_list(0..29)
    assert Enum.all?(decided, &(elem(&1, 3) == 0))

    assert Kuma.read(entity) == Enum.to_list(30..1)
    assert {:ok, %{events: 30}} = Kuma.verify(store, "t1")
  end

  test "each write of a batch gets its own position in its token", %{store: store} do
    entity = Kuma.entity(store, Tally, "t2")
    answers = queued(entity, for(tag <- 1..5, do: fn -> Kuma.execute(entity, {:add, tag, nil}, return: :token) end))

    {:ok, events} = Kuma.events(store, "t2")

    for {{:ok, seq, token}, event} <- Enum.zip(answers, events) do
      assert seq == event.seq
      assert token == %{event.shard => event.position}
    end
  end

  test "a write that fails in a batch fails alone, and a write with no events answers the seq it saw",
       %{store: store} do
    entity = Kuma.entity(store, Tally, "t3")

    answers =
      queued(entity, [
        fn -> Kuma.execute(entity, {:add, 1, nil}) end,
        fn -> Kuma.execute(entity, {:reject, 2}) end,
        fn -> Kuma.execute(entity, :nothing) end,
        fn -> Kuma.execute(entity, {:add, 3, nil}) end,
        fn -> Kuma.append(entity, {:added, 4}, expected_seq: 0) end,
        fn -> Kuma.append(entity, {:added, 5}, expected_seq: 2) end
      ])

    assert answers == [
             {:ok, 1},
             {:error, :rejected},
             {:ok, 1},
             {:ok, 2},
             {:error, {:wrong_expected_seq, 0, 2}},
             {:ok, 3}
           ]

    assert datas(store, "t3") == [{:added, 1}, {:added, 3}, {:added, 5}]
  end

  test "an event the store refuses sends the batch back to one write at a time", %{store: store} do
    entity = Kuma.entity(store, Tally, "t4")
    # A type longer than the store accepts is refused by the native side, not by encoding.
    too_long = {String.duplicate("x", 300), 1}

    answers =
      queued(entity, [
        fn -> Kuma.execute(entity, {:add, 1, nil}) end,
        fn -> Kuma.append(entity, too_long) end,
        fn -> Kuma.execute(entity, {:add, 2, nil}) end
      ])

    assert [{:ok, 1}, {:error, {:too_large, :event_type, 300, 255}}, {:ok, 2}] = answers
    assert datas(store, "t4") == [{:added, 1}, {:added, 2}]
  end

  test "user code that raises in a batch: nothing is written twice and the other writes go through",
       %{store: store} do
    entity = Kuma.entity(store, Tally, "t5")

    answers =
      queued(entity, [
        fn -> Kuma.execute(entity, {:add, 1, nil}) end,
        fn -> Kuma.execute(entity, :crash) end,
        fn -> Kuma.execute(entity, {:add, 3, nil}) end
      ])

    assert [{:ok, 1}, {:error, {:user_code_crashed, :handle, _}}, {:ok, 2}] = answers
    assert datas(store, "t5") == [{:added, 1}, {:added, 3}]
    assert Kuma.read(entity) == [3, 1]
  end

  test "many callers on a few entities: every acknowledged write stored once, in seq order", %{store: store} do
    entities = for i <- 1..3, do: Kuma.entity(store, Tally, "many#{i}")

    acks =
      1..60
      |> Enum.map(fn caller ->
        Task.async(fn ->
          entity = Enum.at(entities, rem(caller, 3))

          for n <- 1..25 do
            {:ok, seq} = Kuma.execute(entity, {:add, {caller, n}, nil})
            {entity.id, seq, {caller, n}}
          end
        end)
      end)
      |> Enum.flat_map(&Task.await(&1, 60_000))

    for {id, group} <- Enum.group_by(acks, &elem(&1, 0)) do
      {:ok, events} = Kuma.events(store, id)
      assert length(events) == length(group) and length(group) == 500
      by_seq = Map.new(events, &{&1.seq, &1.data})
      # Each acknowledged seq holds that caller's own event.
      for {_, seq, tag} <- group, do: assert(by_seq[seq] == {:added, tag})
      assert {:ok, %{events: 500}} = Kuma.verify(store, id)
    end
  end
end
