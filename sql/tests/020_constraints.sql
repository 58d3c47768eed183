-- Invalid rows are refused by the database with an error that names the rule broken.
begin;
\ir fixtures/world.sql
select plan(27);

prepare good_command as
  insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:60', '{0,1}', '{on,off}', '{60,0}');
select lives_ok('good_command', 'a well-formed manual command is accepted');

select throws_like($$insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds, priority)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:60', '{0}', '{on}', '{60}', 120)$$,
  '%relay_commands_slave_priority_range%', 'priority 120 is refused, naming priority_range');
select throws_like($$insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds, priority)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:60', '{0}', '{on}', '{60}', -1)$$,
  '%relay_commands_slave_priority_range%', 'priority -1 is refused');
select throws_like($$insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:60', '{0,1}', '{on}', '{60,60}')$$,
  '%relay_commands_slave_arrays_same_length%', 'arrays of different length are refused');
select throws_like($$insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:60', '{0}', '{on}', '{60,60}')$$,
  '%relay_commands_slave_arrays_same_length%', 'a duration array of another length is refused');
select throws_like($$insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:60', '{0,1,2,3,4,5}', '{on,on,on,on,on,on}', '{1,1,1,1,1,1}')$$,
  '%relay_commands_slave_manual_max_5_relays%', 'a sixth relay in a manual command is refused');
select lives_ok($$insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:60', '{0,1,2,3,4}', '{on,on,on,on,on}', '{1,1,1,1,1}')$$,
  'five relays in a manual command are accepted');
select throws_like($$insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:60', '{}', '{}', '{}')$$,
  '%relay_commands_slave_at_least_one_relay%', 'a command with no relay is refused');
select throws_like($$insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds, status)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:60', '{0}', '{on}', '{60}', 'done')$$,
  '%relay_commands_slave_status_known%', 'an unknown status is refused');
select throws_like($$insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds, command_type)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:60', '{0}', '{on}', '{60}', 'magic')$$,
  '%relay_commands_slave_command_type_known%', 'an unknown command type is refused');
select throws_like($$insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:60', '{16}', '{on}', '{60}')$$,
  '%relay_commands_slave_relay_number_range%', 'relay number 16 is refused');
select throws_like($$insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:60', '{0}', '{toggle}', '{60}')$$,
  '%relay_commands_slave_actions_on_off%', 'a toggle action is refused: actions are absolute');
select throws_like($$insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:60', '{0}', '{on}', '{-5}')$$,
  '%relay_commands_slave_duration_range%', 'a negative duration is refused');
select throws_like($$insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_ALICE_1', '14:33:5c:38:bf', '{0}', '{on}', '{60}')$$,
  '%relay_commands_slave_mac_format%', 'a malformed slave MAC address is refused');
select throws_like($$insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds, command_type, triggered_by)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:60', '{0}', '{on}', '{60}', 'rule', 'rule')$$,
  '%relay_commands_slave_rule_names_rule%', 'a rule command without rule_id is refused');
select throws_like($$insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds, created_at, expires_at)
  values ('ESP32_ALICE_1', '14:33:5C:38:BF:60', '{0}', '{on}', '{60}', now(), now() - interval '1 second')$$,
  '%relay_commands_slave_expiry_window%', 'a command that expires before it is created is refused');

-- A retried insert with the same client_id does not create a second command.
insert into relay_commands_slave (client_id, master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('c0000000-0000-0000-0000-0000000000c1', 'ESP32_ALICE_1', '14:33:5C:38:BF:60', '{0}', '{on}', '{60}')
  on conflict (client_id) do nothing;
insert into relay_commands_slave (client_id, master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('c0000000-0000-0000-0000-0000000000c1', 'ESP32_ALICE_1', '14:33:5C:38:BF:60', '{0}', '{on}', '{60}')
  on conflict (client_id) do nothing;
select is((select count(*) from relay_commands_slave where client_id = 'c0000000-0000-0000-0000-0000000000c1'),
  1::bigint, 'a retried insert with the same client_id leaves one command');

-- Status transitions.
select tests.command('ESP32_ALICE_1') as done_id \gset
update relay_commands_slave set status = 'completed' where id = :done_id;
select throws_like(format('update relay_commands_slave set status = %L where id = %s', 'pending', :done_id),
  '%relay_commands_slave_terminal_status%', 'a completed command cannot go back to pending');
select throws_like(format('update relay_commands_slave set relay_numbers = %L where id = %s', '{3}', :done_id),
  '%relay_commands_slave_immutable_content%', 'a command''s relays cannot be edited after it is written');
select tests.command('ESP32_ALICE_1', 'manual', 10, now() - interval '10 minutes', now() - interval '1 minute') as stale_id \gset
select throws_like(format('update relay_commands_slave set status = %L where id = %s', 'processing', :stale_id),
  '%relay_commands_slave_expired%', 'an expired command cannot be handed out by a direct update');

-- Rules.
select throws_like($$insert into decision_rules (device_id, rule_id, rule_name, rule_json, priority)
  values ('ESP32_ALICE_1', 'R1', 'x', '{"conditions":{},"actions":[{"type":"relay_on"}]}', 120)$$,
  '%decision_rules_priority_range%', 'a rule with priority 120 is refused');
select throws_like($$insert into decision_rules (device_id, rule_id, rule_name, rule_json)
  values ('ESP32_ALICE_1', 'R1', 'x', '{"conditions":{}}')$$,
  '%decision_rules_rule_json_shape%', 'a rule without actions is refused');
select throws_like($$insert into decision_rules (device_id, rule_id, rule_name, rule_json)
  values ('ESP32_ALICE_1', 'R1', 'x', '{"conditions":{},"actions":[]}')$$,
  '%decision_rules_rule_json_shape%', 'a rule with an empty action list is refused');
select throws_like($$insert into decision_rules (device_id, rule_id, rule_name, rule_json)
  values ('ESP32_ALICE_1', 'R1', 'x', '{"actions":[{"type":"relay_on"}]}')$$,
  '%decision_rules_rule_json_shape%', 'a rule without conditions is refused');
select throws_like($$insert into telemetry_data (device_id, sensor_key, value, recorded_at)
  values ('ESP32_ALICE_1', 'ph value!', 6.5, now())$$,
  '%telemetry_data_sensor_key_format%', 'a malformed sensor key is refused');
select throws_like($$insert into event_logs (device_id, event_type, severity) values ('ESP32_ALICE_1', 'x', 'panic')$$,
  '%event_logs_severity_known%', 'an unknown event severity is refused');
select throws_like($$insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
  values ('ESP32_NOBODY', '14:33:5C:38:BF:60', '{0}', '{on}', '{60}')$$,
  '%relay_commands_slave_master_device_id_fkey%', 'a command for an unknown master is refused');

select * from finish();
rollback;
