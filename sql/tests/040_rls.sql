-- Row-level security: each kind of caller sees and changes exactly its own rows.
begin;
\ir fixtures/world.sql
select plan(37);

select tests.command('ESP32_ALICE_1') as a1 \gset
select tests.command('ESP32_ALICE_2') as a2 \gset
select tests.command('ESP32_ALICE_R') as ar \gset
select tests.command('ESP32_BOB_1') as b1 \gset
insert into decision_rules (device_id, rule_id, rule_name, rule_json) values
  ('ESP32_ALICE_1', 'R1', 'ph low', '{"conditions":{"type":"sensor_compare","sensor":"ph","operator":"<","value":6.5},"actions":[{"type":"relay_off","slave_mac_address":"14:33:5C:38:BF:60","relay_number":0}]}'),
  ('ESP32_ALICE_2', 'R2', 'ec low', '{"conditions":{"type":"sensor_compare","sensor":"ph","operator":"<","value":6.5},"actions":[{"type":"relay_off","slave_mac_address":"14:33:5C:38:BF:60","relay_number":0}]}'),
  ('ESP32_BOB_1', 'R3', 'bob rule', '{"conditions":{"type":"sensor_compare","sensor":"ph","operator":"<","value":6.5},"actions":[{"type":"relay_off","slave_mac_address":"14:33:5C:38:BF:60","relay_number":0}]}');
insert into macros (id, owner_id, agent_id, name) values
  ('d0000000-0000-0000-0000-0000000000d1', 'a0000000-0000-0000-0000-000000000001', 'pi-alice', 'flush');

-- A dashboard user: every device of theirs, nothing of anyone else.
select tests.as_alice();
select bag_eq('select device_id from device_status', $$values ('ESP32_ALICE_1'), ('ESP32_ALICE_2'), ('ESP32_ALICE_R')$$,
  'alice sees her three devices and not bob''s');
select bag_eq('select id from relay_commands_slave', format('values (%s::bigint), (%s), (%s)', :a1, :a2, :ar),
  'alice sees the commands of her devices only');
select is((select count(*) from decision_rules), 2::bigint, 'alice sees her two rules');
select throws_like(format($$insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_BOB_1', '14:33:5C:38:BF:60', '{0}', '{on}', '{60}')$$),
  'relay_commands_slave_unknown_master%', 'alice cannot send a command to bob''s master');
select lives_ok($$insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:60', '{0}', '{on}', '{60}')$$, 'alice can send a command to her master');
select throws_like($$insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds, status)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:60', '{0}', '{on}', '{60}', 'completed')$$,
  'relay_commands_slave_new_is_pending%', 'a person cannot insert a command that claims to have run');
select throws_like($$update device_status set agent_id = 'pi-bob' where device_id = 'ESP32_ALICE_1'$$,
  '%row-level security%', 'alice cannot hand her master to bob''s agent');
select throws_like($$insert into telemetry_data (device_id, sensor_key, value, recorded_at) values ('ESP32_ALICE_1', 'ph', 6.1, now())$$,
  '%row-level security%', 'a person cannot forge telemetry');
insert into system_status (owner_id, emergency_stop, emergency_reason) values ('a0000000-0000-0000-0000-000000000001', true, 'test');

select tests.as_bob();
select bag_eq('select device_id from device_status', $$values ('ESP32_BOB_1')$$, 'bob sees only his device');
select is((select count(*) from system_status), 0::bigint, 'bob does not see alice''s emergency stop');
select is_empty($$update relay_commands_slave set status = 'cancelled' where master_device_id = 'ESP32_ALICE_1' returning id$$,
  'bob cannot cancel alice''s commands');
select is_empty(format('select id from complete_slave_command(%s, 10)', :a1), 'bob cannot complete alice''s command');
select is_empty('select id from get_active_decision_rules(''ESP32_ALICE_1'')', 'bob gets no rules of alice''s master');

-- An agent: only the masters assigned to it, even among its owner's devices.
select tests.as_agent('pi-alice');
select bag_eq('select device_id from device_status', $$values ('ESP32_ALICE_1')$$,
  'agent pi-alice sees only the master assigned to it');
select bag_eq('select id from relay_commands_slave', format('values (%s::bigint), (%s)', :a1, (select max(id) from relay_commands_slave where master_device_id = 'ESP32_ALICE_1')),
  'agent pi-alice sees only its master''s commands');
select is_empty('select id from get_and_lock_slave_commands(''ESP32_ALICE_2'')',
  'agent pi-alice gets nothing when locking another agent''s master');
select is((select count(*) from system_status where emergency_stop), 1::bigint, 'an agent sees its owner''s emergency stop');
select is((select count(*) from macros), 1::bigint, 'an agent sees the macros assigned to it');
select lives_ok($$insert into device_status (device_id, owner_id, agent_id) values
  ('ESP32_NEW', 'a0000000-0000-0000-0000-000000000001', 'pi-alice')$$, 'an agent registers a master it discovered');
select throws_like($$insert into device_status (device_id, owner_id, agent_id) values
  ('ESP32_NEW2', 'a0000000-0000-0000-0000-000000000001', 'pi-alice-2')$$,
  '%row-level security%', 'an agent cannot register a master for another agent');
select throws_like($$insert into device_status (device_id, owner_id, agent_id) values
  ('ESP32_NEW3', 'b0000000-0000-0000-0000-000000000002', 'pi-bob')$$,
  '%row-level security%', 'an agent cannot register a master for another owner');
select throws_like($$update device_status set owner_id = 'b0000000-0000-0000-0000-000000000002' where device_id = 'ESP32_ALICE_1'$$,
  '%row-level security%', 'an agent cannot give its master away');
select lives_ok($$insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds, command_type, triggered_by, rule_id, status)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:60', '{0}', '{on}', '{60}', 'rule', 'rule', 'R1', 'completed')$$,
  'an agent reports a rule command it already ran');
select lives_ok($$insert into telemetry_data (device_id, sensor_key, value, recorded_at) values ('ESP32_ALICE_1', 'ph', 6.1, now())$$,
  'an agent pushes its master''s telemetry');
select lives_ok($$insert into event_logs (agent_id, event_type, message) values ('pi-alice', 'outage_ended', 'back online')$$,
  'an agent logs its own events');
select throws_like($$insert into event_logs (agent_id, event_type) values ('pi-alice-2', 'x')$$,
  '%row-level security%', 'an agent cannot log events as another agent');

select tests.as_agent('pi-alice-2');
select is((select count(*) from macros), 0::bigint, 'an agent does not see another agent''s macros');
select is((select count(*) from event_logs), 0::bigint, 'an agent does not see another agent''s events');

select tests.as_agent('pi-revoked');
select is((select count(*) from device_status), 0::bigint, 'a revoked agent sees nothing');
select is_empty('select id from get_and_lock_slave_commands(''ESP32_ALICE_R'')', 'a revoked agent locks nothing');

-- A master polling directly: only itself.
select tests.as_master('ESP32_ALICE_2');
select bag_eq('select id from relay_commands_slave', format('values (%s::bigint)', :a2), 'a master sees only its own commands');
select is((select count(*) from get_active_decision_rules('ESP32_ALICE_2')), 1::bigint, 'a master reads its own rules');
select is_empty('select id from get_active_decision_rules(''ESP32_ALICE_1'')', 'a master reads no sibling master''s rules');
select throws_like($$insert into telemetry_data (device_id, sensor_key, value, recorded_at) values ('ESP32_ALICE_1', 'ph', 6.1, now())$$,
  '%row-level security%', 'a master cannot push telemetry for a sibling');

-- anon: nothing at all.
select tests.as_anon();
select throws_ok('select * from device_status', '42501', null, 'anon cannot read devices');
select throws_ok('select * from get_and_lock_slave_commands(''ESP32_ALICE_1'')', '42501', null, 'anon cannot call the RPC');

select tests.as_superuser();
select is((select status from relay_commands_slave where id = :a2), 'pending',
  'commands of masters a caller may not see stayed pending');

select * from finish();
rollback;
