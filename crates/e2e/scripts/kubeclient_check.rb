# Uses Ruby's kubeclient (the client library GitLab uses) against kas's Kubernetes API
# proxy. Arguments: proxy URL, CA file, bearer token, expected outcome ("ok" or "forbidden").
require 'kubeclient'

url, ca_file, token, expect = ARGV
client = Kubeclient::Client.new(
  "#{url}/api", 'v1',
  ssl_options: { ca_file: ca_file, verify_ssl: OpenSSL::SSL::VERIFY_PEER },
  auth_options: { bearer_token: token },
  http_max_redirects: 0
)
begin
  pods = client.get_pods(namespace: 'default')
  cm = client.create_config_map(Kubeclient::Resource.new(
    metadata: { name: 'from-kubeclient', namespace: 'default' }, data: { 'k' => 'v' }
  ))
  puts "pods: #{pods.map { |p| p.metadata.name }.sort.join(',')}"
  puts "created: #{cm.metadata.name}"
  puts "got: #{client.get_config_map('from-kubeclient', 'default').data.k}"
  exit(expect == 'ok' ? 0 : 1)
rescue Kubeclient::HttpError => e
  puts "http error #{e.error_code}: #{e.message}"
  exit(expect == 'forbidden' && e.error_code == 403 ? 0 : 1)
end
