defmodule Kuma.CodecTest do
  use Kuma.StoreCase, async: true
  doctest Kuma.Codec
  doctest Kuma.Position

  alias Kuma.Codec

  test "types follow the documented rules" do
    assert Codec.event_type(%URI{}) == "URI"
    assert Codec.event_type({:credited, 1}) == "credited"
    assert Codec.event_type({"credited", 1}) == "credited"
    assert Codec.event_type({nil, 1}) == ""
    assert Codec.event_type({true, 1}) == ""
    # A tagged tuple of any size (an Erlang record, a Gleam custom type) is typed by its tag.
    assert Codec.event_type({:a, 1, 2}) == "a"
    assert Codec.event_type({:user_created, "Dwighson", "architect", 3}) == "user_created"
    assert Codec.event_type({nil, 1, 2}) == ""
    assert Codec.event_type({1, 2, 3}) == ""
    assert Codec.event_type(:closed) == ""
    assert Codec.event_type("plain") == ""
  end

  test "metadata must be a map; empty metadata is stored as nothing" do
    assert {:ok, <<>>} = Codec.encode_metadata(nil)
    assert {:ok, <<>>} = Codec.encode_metadata(%{})
    assert {:ok, bin} = Codec.encode_metadata(%{a: 1})
    assert Codec.decode_metadata(bin) == %{a: 1}
    assert {:error, {:invalid, :metadata, _}} = Codec.encode_metadata(a: 1)
  end

  # An atom that this VM has never seen, spelled in external term format by hand so that
  # the test itself does not create it.
  test "an unknown atom decodes under :trusted and raises under :safe" do
    bytes = unknown_atom_term()
    assert_raise ArgumentError, fn -> :erlang.binary_to_term(bytes, [:safe]) end
    assert_raise Kuma.DecodeError, ~r/decode: :safe/, fn -> Codec.decode!(bytes, "", "e", 1, :safe) end
    assert is_atom(Codec.decode!(bytes, "", "e", 1, :trusted))
  end

  test "malformed bytes raise a DecodeError naming the event" do
    assert_raise Kuma.DecodeError, ~r/event 3 of entity "e"/, fn ->
      Codec.decode!(<<131, 255>>, "", "e", 3, :trusted)
    end
  end

  @tag store: false
  test "reading an event with an unknown atom: :trusted decodes it, :safe raises", %{dir: dir} do
    for {mode, i} <- [trusted: 1, safe: 2] do
      name = :"codec_#{mode}_#{System.unique_integer([:positive])}"
      {:ok, store} = Kuma.start(name: name, data_dir: Path.join(dir, "#{i}"), shards: 1, decode: mode)
      # Queue the crafted payload through the NIF, as if another VM had written it.
      ref = make_ref()
      {:ok, :ok} = Kuma.Native.write_append(store.native, ref, "e", nil, [{"", <<>>, unknown_atom_term(), nil}])
      assert_receive {:kuma_reply, ^ref, {:ok, _}}

      case mode do
        :trusted ->
          assert [%{data: atom}] = Enum.to_list(Kuma.stream(store, "e"))
          assert is_atom(atom) and Atom.to_string(atom) =~ "kuma_never_seen_atom_"

        :safe ->
          assert_raise Kuma.DecodeError, fn -> Enum.to_list(Kuma.stream(store, "e")) end
      end

      :ok = Kuma.stop(store)
    end
  end
end

defmodule Kuma.CodecAtomsTest do
  # Alone (async: false), so that the atom table only grows by what this test does.
  use Kuma.StoreCase, async: false

  alias Kuma.Codec

  @tag store: false
  test "decode: :safe creates no atom, whatever types and payloads are stored", %{dir: dir} do
    name = :"codec_atoms_#{System.unique_integer([:positive])}"
    {:ok, store} = Kuma.start(name: name, data_dir: dir, shards: 1, decode: :safe)

    # 2,000 events as a hostile writer would store them: unknown types, unknown atoms.
    for i <- 1..2_000 do
      ref = make_ref()
      event = {"KumaUnknownType#{i}_#{System.unique_integer([:positive])}", <<>>, unknown_atom_term(), nil}
      {:ok, :ok} = Kuma.Native.write_append(store.native, ref, "hostile", nil, [event])
      assert_receive {:kuma_reply, ^ref, {:ok, _}}
    end

    atoms_before = :erlang.system_info(:atom_count)
    assert_raise Kuma.DecodeError, fn -> Enum.to_list(Kuma.stream(store, "hostile")) end

    for seq <- 1..2_000//97,
        do: assert_raise(Kuma.DecodeError, fn -> Kuma.stream(store, "hostile", from: seq) |> Enum.take(1) end)

    # 2,000 reads used to create one atom each.
    assert :erlang.system_info(:atom_count) - atoms_before < 20

    # A struct module that exists on disk but is not loaded yet is still found and loaded.
    assert Codec.decode!(
             :erlang.term_to_binary(%Kuma.Envelope{
               entity_id: "x",
               seq: 1,
               position: 1,
               shard: 0,
               type: "",
               timestamp: 0,
               metadata: %{},
               data: 1,
               hash: <<>>
             }),
             "Kuma.Envelope",
             "e",
             1,
             :safe
           )

    :ok = Kuma.stop(store)
  end
end
