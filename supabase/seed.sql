-- Demo data for `supabase db reset` on a developer's Supabase: one grower, one Pi agent, one
-- hydroponics master and the seed's pH rule. Never applied to production.
insert into auth.users (id, email)
values ('00000000-0000-4000-8000-00000000a11c', 'grower@example.com')
on conflict do nothing;

insert into public.edge_agents (agent_id, owner_id, name)
values ('pi-greenhouse', '00000000-0000-4000-8000-00000000a11c', 'greenhouse Pi')
on conflict do nothing;

insert into public.device_status (device_id, owner_id, agent_id, device_name, mac_address)
values ('ESP32_HIDRO_F44738', '00000000-0000-4000-8000-00000000a11c', 'pi-greenhouse',
        'Hydroponics master', '24:6F:28:F4:47:38')
on conflict do nothing;

insert into public.decision_rules (device_id, rule_id, rule_name, rule_json, priority, created_by)
values ('ESP32_HIDRO_F44738', 'RULE_001', 'Ajustar pH quando baixo',
        '{"conditions": {"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": 6.5},
          "actions": [{"type": "relay_on", "slave_mac_address": "14:33:5C:38:BF:60", "relay_number": 0, "duration_seconds": 60}]}',
        50, 'seed')
on conflict do nothing;
