defmodule Kuma.TamperTest do
  # Promise 4: a tampered or corrupted event is detected by verify, and never read back as
  # if it were intact.
  use Kuma.StoreCase, async: true

  @moduletag store: false

  setup %{dir: dir, name: name} = ctx do
    encryption = Map.get(ctx, :encryption, true)
    {:ok, store} = Kuma.start(name: name, data_dir: dir, shards: 1, encryption: encryption)

    {:ok, 10} =
      Kuma.append(store, "victim", for(i <- 1..10, do: {:deposited, "MARK-#{i}-#{String.duplicate("v", 40)}"}))

    {:ok, 10} = Kuma.append(store, "bystander", for(i <- 1..10, do: {:deposited, i}))
    :ok = Kuma.stop(store)
    %{shard: Path.join(dir, "shards/000.kuma"), encryption: encryption}
  end

  defp reopen(%{dir: dir, name: name, encryption: encryption}),
    do: Kuma.start(name: name, data_dir: dir, shards: 1, encryption: encryption)

  @tag :sqlite3_cli
  test "a row altered with the sqlite3 CLI is caught", %{shard: shard} = ctx do
    sqlite3 = System.find_executable("sqlite3") || flunk("sqlite3 CLI not installed (bin/setup installs it)")
    # Change the payload of seq 4 of the first entity (eid 1 = "victim").
    {_, 0} = System.cmd(sqlite3, [shard, "UPDATE events SET payload = X'836400' WHERE eid = 1 AND seq = 4;"])
    {:ok, store} = reopen(ctx)
    assert {:error, {:tampered, 4, why}} = Kuma.verify(store, "victim")
    assert why =~ "hash"
    assert {:ok, %{events: 10}} = Kuma.verify(store, "bystander")
    assert {:error, {:tampered, [%{entity_id: "victim", seq: 4, shard: 0}]}} = Kuma.verify_store(store)
  end

  @tag :sqlite3_cli
  @tag encryption: false
  test "a payload overwritten with text is named by its seq, by verify and by reads", %{shard: shard} = ctx do
    sqlite3 = System.find_executable("sqlite3") || flunk("sqlite3 CLI not installed (bin/setup installs it)")
    {_, 0} = System.cmd(sqlite3, [shard, "UPDATE events SET payload = 'hello' WHERE eid = 1 AND seq = 4;"])
    {:ok, store} = reopen(ctx)
    assert {:error, {:tampered, 4, _}} = Kuma.verify(store, "victim")
    assert {:error, {:tampered, [%{entity_id: "victim", seq: 4}]}} = Kuma.verify_store(store)
    assert {:error, {:corrupt, 4, _}} = Kuma.events(store, "victim")
    assert {:ok, [_, _, _]} = Kuma.events(store, "victim", limit: 3)
  end

  @tag :sqlite3_cli
  test "a deleted row and a reordered row are caught", %{shard: shard} = ctx do
    sqlite3 = System.find_executable("sqlite3") || flunk("sqlite3 CLI not installed (bin/setup installs it)")
    {_, 0} = System.cmd(sqlite3, [shard, "DELETE FROM events WHERE eid = 1 AND seq = 6;"])
    {:ok, store} = reopen(ctx)
    assert {:error, {:tampered, 6, _}} = Kuma.verify(store, "victim")
    :ok = Kuma.stop(store)
    {_, 0} = System.cmd(sqlite3, [shard, "UPDATE events SET seq = 2 WHERE eid = 2 AND seq = 3;"])
    {:ok, store} = reopen(ctx)
    assert {:error, {:tampered, 3, _}} = Kuma.verify(store, "bystander")
  end

  @tag encryption: false
  test "a flipped byte in the file is caught, and the chain names its seq", %{shard: shard} = ctx do
    bytes = File.read!(shard)
    {offset, _} = :binary.match(bytes, "MARK-7-")
    <<before::binary-size(offset), c, rest::binary>> = bytes
    File.write!(shard, <<before::binary, Bitwise.bxor(c, 0x20), rest::binary>>)
    {:ok, store} = reopen(ctx)
    assert {:error, {:tampered, 7, _}} = Kuma.verify(store, "victim")
    assert {:ok, %{events: 10}} = Kuma.verify(store, "bystander")
    # No cipher here to notice: reads check the chain, so the changed byte is never read
    # back as if it were the stored event, and the entity does not start on wrong data.
    assert {:error, {:corrupt, 7, _}} = Kuma.events(store, "victim")
    assert {:ok, events} = Kuma.events(store, "victim", limit: 6)
    assert length(events) == 6
    assert {:error, {:corrupt, 7, _}} = store |> Kuma.entity("victim") |> Kuma.Entity.fetch()
  end

  @tag :sqlite3_cli
  test "a flipped ciphertext byte is caught by verify and by reads", %{shard: shard} = ctx do
    sqlite3 = System.find_executable("sqlite3") || flunk("sqlite3 CLI not installed (bin/setup installs it)")
    # The plaintext marker is nowhere in the file: payloads are sealed.
    refute File.read!(shard) =~ "MARK-7-"
    {hex, 0} = System.cmd(sqlite3, [shard, "SELECT hex(payload) FROM events WHERE eid = 1 AND seq = 7;"])
    ciphertext = Base.decode16!(String.trim(hex))
    bytes = File.read!(shard)
    {offset, _} = :binary.match(bytes, ciphertext)
    flip = offset + div(byte_size(ciphertext), 2)
    <<before::binary-size(flip), c, rest::binary>> = bytes
    File.write!(shard, <<before::binary, Bitwise.bxor(c, 0x01), rest::binary>>)
    {:ok, store} = reopen(ctx)
    assert {:error, {:tampered, 7, _}} = Kuma.verify(store, "victim")
    assert {:ok, %{events: 10}} = Kuma.verify(store, "bystander")
    assert {:error, {:corrupt, 7, _}} = Kuma.events(store, "victim")
    assert {:ok, events} = Kuma.events(store, "bystander")
    assert length(events) == 10
  end

  @tag :sqlite3_cli
  test "a ciphertext copied to another seq or entity is refused", %{shard: shard} = ctx do
    sqlite3 = System.find_executable("sqlite3") || flunk("sqlite3 CLI not installed (bin/setup installs it)")
    # seq 3 of the victim gets the (valid) ciphertext of its seq 2; seq 5 of the bystander
    # gets the victim's seq 5.
    {_, 0} =
      System.cmd(sqlite3, [
        shard,
        "UPDATE events SET payload = (SELECT payload FROM events WHERE eid = 1 AND seq = 2) WHERE eid = 1 AND seq = 3;" <>
          "UPDATE events SET payload = (SELECT payload FROM events WHERE eid = 1 AND seq = 5) WHERE eid = 2 AND seq = 5;"
      ])

    {:ok, store} = reopen(ctx)
    # The chain refuses them on read, before the cipher would (the cipher's own binding to
    # entity and seq is tested in the core, with a forged chain).
    assert {:error, {:corrupt, 3, _}} = Kuma.events(store, "victim")
    assert {:error, {:corrupt, 5, _}} = Kuma.events(store, "bystander")
    assert {:ok, [%{seq: 1}, %{seq: 2, data: {:deposited, "MARK-2-" <> _}}]} = Kuma.events(store, "victim", limit: 2)
    assert {:error, {:tampered, 3, _}} = Kuma.verify(store, "victim")
    assert Kuma.format_error({:decrypt_failed, 3, "x"}) =~ "did not decrypt"
  end
end
